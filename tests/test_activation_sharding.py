"""The ambient mesh (parallel.use_mesh) and activation sharding (models/sharding.py):
under the mesh every block's output is constrained batch-split over ('data', 'fsdp');
outside it nothing changes; the values are the same either way. The helpers read the
ambient mesh, and say what to do when there is none."""
import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vqvae2_jax import config_lib, parallel
from vqvae2_jax.eval import reconstruction
from vqvae2_jax.models import vqvae as vqvae_lib
from vqvae2_jax.models.prior import PixelSNAILPrior

RULES = config_lib.DEFAULT_AXIS_RULES


def _mesh():
  """2 x 4 ('data', 'fsdp') mesh over the 8 fake CPU devices."""
  mesh_config = config_lib.base_config().mesh
  with mesh_config.unlocked():
    mesh_config.update(dict(data=2, fsdp=4))
  return parallel.make_mesh(mesh_config)


def _models_and_inputs():
  rng = np.random.default_rng(0)
  vqvae = vqvae_lib.VQVAE2(num_levels=2, hidden=16, res_hidden=8, num_res_layers=2,
                           num_codes=16, code_dim=8, upsample="subpixel")
  prior = functools.partial(
      PixelSNAILPrior, num_codes=16, hidden=16, res_hidden=16, num_layers=2,
      attention_every=1, num_heads=2, kernel_size=3, num_output_layers=1, num_cond_layers=1,
      num_cond_levels=1, cond_scales=(2,), num_classes=3)
  image = jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
  codes = (jnp.asarray(rng.integers(0, 16, (8, 8, 8)), jnp.int32),
           (jnp.asarray(rng.integers(0, 16, (8, 4, 4)), jnp.int32),),
           jnp.asarray(rng.integers(0, 3, (8,)), jnp.int32))
  return ((vqvae, (image,)), (prior(scan_layers=False), codes), (prior(), codes))


# Constrained block outputs per traced model: stage 1's 8 blocks; the unrolled prior's
# 2 gated layers x (v, h), 2 attention, 1 output and 1 conditioning block; the scanned
# prior traces each repeated block once, in its scan body: (v, h), attention, output and
# conditioning block.
BATCH_SPLIT_SITES = (8, 8, 5)


def _constraints(jaxpr) -> list:
  """The shardings of every sharding_constraint in a jaxpr, nested ones too."""
  found = [eqn.params["sharding"] for eqn in jaxpr.eqns
           if eqn.primitive.name == "sharding_constraint"]
  for sub in jax.extend.core.subjaxprs(jaxpr):
    found += _constraints(sub)
  return found


def test_blocks_are_batch_sharded_inside_the_context_only():
  mesh = _mesh()
  for (model, inputs), sites in zip(_models_and_inputs(), BATCH_SPLIT_SITES):
    variables = model.init(jax.random.PRNGKey(0), *inputs, train=False)
    apply = lambda v, *x: model.apply(v, *x, train=False)
    outside = jax.make_jaxpr(apply)(variables, *inputs).jaxpr
    assert _constraints(outside) == [], type(model).__name__
    with parallel.use_mesh(mesh, RULES):
      inside = jax.make_jaxpr(apply)(variables, *inputs).jaxpr
    specs = [tuple(s.spec if hasattr(s, "spec") else s) for s in _constraints(inside)]
    # (Flax also pins each parameter to its own logical sharding under the rules: the
    # specs that do not start with the batch axes.)
    batch_split = [p for p in specs if p and p[0] == ("data", "fsdp")]
    assert len(batch_split) == sites, (type(model).__name__, specs)
    assert all(d is None for p in batch_split for d in p[1:])


def test_values_and_gradients_are_unchanged_on_an_fsdp_mesh():
  mesh = _mesh()
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  for model, inputs in _models_and_inputs():
    variables = model.init(jax.random.PRNGKey(0), *inputs, train=False)
    inputs = jax.tree.map(lambda x: jax.device_put(x, batch), inputs)

    def loss(params, *x):
      out = model.apply({**variables, "params": params}, *x, train=False)
      out = out.reconstruction if hasattr(out, "reconstruction") else out
      return jnp.mean(out.astype(jnp.float32) ** 2)

    fn = jax.jit(jax.value_and_grad(loss))
    plain = fn(variables["params"], *inputs)
    with parallel.use_mesh(mesh, RULES):
      constrained = jax.jit(jax.value_and_grad(loss))(variables["params"], *inputs)
    chex.assert_trees_all_close(constrained, plain, rtol=1e-5, atol=1e-6)


def test_helpers_read_the_ambient_mesh_and_nested_entry_changes_nothing():
  mesh = _mesh()
  assert not parallel.mesh_is_set()
  with parallel.use_mesh(mesh, RULES):
    assert parallel.current_mesh() is mesh
    assert parallel.batch_sharding() == NamedSharding(mesh, P(("data", "fsdp")))
    with parallel.use_mesh(mesh, RULES):  # a Run method calling another
      assert parallel.current_mesh() is mesh
      assert parallel.replicated() == NamedSharding(mesh, P())
    assert parallel.current_mesh() is mesh
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
      parallel.check_batch_size(12, "sample.batch_size")
  assert not parallel.mesh_is_set()


def test_a_library_call_without_a_mesh_fails_with_one_line_saying_what_to_do():
  vqvae, _ = _models_and_inputs()[0]
  for call in (parallel.batch_sharding, lambda: parallel.host_to_global({"x": np.zeros(8)}),
               lambda: reconstruction.make_reconstruct_fn(vqvae)):
    with pytest.raises(RuntimeError) as info:
      call()
    message = str(info.value)
    assert message == parallel.NO_MESH_MESSAGE and "\n" not in message
    assert "parallel.use_mesh(mesh, config.axis_rules)" in message
