"""Memory levers: remat == no remat (values and grads); an accumulated step == one step on
the whole batch (parameters, optimizer state and the VQ-VAE's EMA codebooks)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqvae2_jax.models import vqvae as vqvae_lib
from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.train import state as state_lib
from vqvae2_jax.train import step as step_lib


def tiny_vqvae(**kw):
  return vqvae_lib.VQVAE2(num_levels=2, hidden=16, res_hidden=8, num_res_layers=2,
                          num_codes=16, code_dim=8, upsample="subpixel", **kw)


def tiny_prior(**kw):
  return PixelSNAILPrior(num_codes=16, hidden=16, res_hidden=16, num_layers=2,
                         attention_every=1, num_heads=2, kernel_size=3, num_output_layers=1,
                         num_cond_layers=1, num_cond_levels=1, cond_scales=(2,),
                         num_classes=3, **kw)


def images(batch=8, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)),
                     jnp.float32)


def prior_batch(batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"codes": jnp.asarray(rng.integers(0, 16, (batch, 8, 8)), jnp.int32),
          "cond": jnp.asarray(rng.integers(0, 16, (batch, 4, 4)), jnp.int32),
          "label": jnp.asarray(rng.integers(0, 3, (batch,)), jnp.int32)}


def test_vqvae_remat_block_equals_none():
  x = images(4)
  plain, remat = tiny_vqvae(), tiny_vqvae(remat="block")
  variables = plain.init(jax.random.PRNGKey(0), x, train=False)
  # Same parameter tree: remat is not a model-shaping field.
  chex.assert_trees_all_equal_shapes(variables, remat.init(jax.random.PRNGKey(0), x, train=False))

  def loss(model, params):
    out = model.apply({**variables, "params": params}, x, train=False)
    return jnp.mean((out.reconstruction - x)**2) + out.commitment_loss

  for fn in (loss, jax.grad(loss, argnums=1)):
    chex.assert_trees_all_close(fn(remat, variables["params"]), fn(plain, variables["params"]),
                                rtol=1e-5, atol=1e-6)
  # The remat'd program really checkpoints (so the test compares two different programs).
  jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, remat)))(variables["params"]))
  assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_prior_remat_block_equals_none_with_dropout():
  b = prior_batch(4)
  plain, remat = tiny_prior(), tiny_prior(remat="block")
  params = plain.init(jax.random.PRNGKey(0), b["codes"], (b["cond"],), b["label"],
                      train=False)["params"]

  def loss(model, params):
    logits = model.apply({"params": params}, b["codes"], (b["cond"],), b["label"], train=True,
                         rngs={"dropout": jax.random.PRNGKey(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["codes"]).mean()

  for fn in (loss, jax.grad(loss, argnums=1)):
    chex.assert_trees_all_close(fn(remat, params), fn(plain, params), rtol=1e-5, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, remat)))(params))
  assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= 4  # gated, attention, res blocks


def test_unknown_remat_mode_is_a_clear_error():
  with pytest.raises(ValueError, match="remat mode 'layer'"):
    tiny_prior(remat="layer").init(jax.random.PRNGKey(0), *prior_batch(2).values(), train=False)


def vqvae_loss(model, deferred):
  """The stage-1 loss (MSE + beta * commitment); EMA deferred to vq_batch or immediate."""
  def loss_fn(params, model_state, batch, rng):
    out, updates = model.apply({"params": params, **model_state}, batch["image"], train=True,
                               mutable=["vq_batch" if deferred else "vq_stats"],
                               rngs={"reseed": rng})
    loss = jnp.mean((out.reconstruction - batch["image"])**2) + 0.25 * out.commitment_loss
    return loss, ({"mse": loss}, {**model_state, **updates})
  return loss_fn


def one_step(loss_fn, variables, batch, accum, finalize=None, tx=None):
  tx = tx or optax.adam(1e-3)
  params = variables["params"]
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      model_state={k: v for k, v in variables.items() if k != "params"}, ema_params={},
      rng=jax.random.PRNGKey(3))
  step = jax.jit(step_lib.make_train_step(loss_fn, tx, 0.0, accum, finalize))
  for _ in range(2):
    state, metrics = step(state, batch)
  return state, metrics


def test_accumulated_vqvae_step_equals_whole_batch_including_ema_codebooks():
  model = tiny_vqvae(decay=0.9)
  batch = {"image": images(8)}
  variables = model.init(jax.random.PRNGKey(0), batch["image"], train=False)
  finalize = vqvae_lib.finalize_codebooks(model)
  whole, m_whole = one_step(vqvae_loss(model, False), variables, batch, 1)
  deferred, _ = one_step(vqvae_loss(model, True), variables, batch, 1, finalize)
  accumulated, m_acc = one_step(vqvae_loss(model, True), variables, batch, 4, finalize)
  assert set(accumulated.model_state) == {"vq_stats"}  # nothing of vq_batch is kept
  for other in (deferred, accumulated):
    # Adam divides by sqrt(v): float32 rounding in a near-zero gradient becomes up to ~1%
    # of one step (lr 1e-3) in a few parameters, hence atol 1e-5 on params / moments.
    chex.assert_trees_all_close((other.params, other.opt_state, other.model_state),
                                (whole.params, whole.opt_state, whole.model_state),
                                rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(m_acc["loss"], m_whole["loss"], rtol=1e-5)
  # The codebooks really moved (the comparison is not of two untouched states).
  moved = jnp.abs(whole.model_state["vq_stats"]["quantizers_1"]["ema_count"]
                  - variables["vq_stats"]["quantizers_1"]["ema_count"]).max()
  assert moved > 0.05


def test_accumulated_prior_step_equals_whole_batch():
  model = tiny_prior(dropout=0.0, attn_dropout=0.0)
  batch = prior_batch(8)

  def loss_fn(params, model_state, batch, rng):
    logits = model.apply({"params": params}, batch["codes"], (batch["cond"],), batch["label"],
                         train=True, rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["codes"]).mean()
    return loss, ({"nll": loss}, model_state)

  variables = model.init(jax.random.PRNGKey(0), batch["codes"], (batch["cond"],),
                         batch["label"], train=False)
  # SGD: Adam would turn float noise in gradients that are zero in exact arithmetic (the
  # attention key bias) into full-size steps.
  tx = optax.sgd(0.1, momentum=0.9)
  whole, _ = one_step(loss_fn, variables, batch, 1, tx=tx)
  for accum in (2, 8):
    acc, _ = one_step(loss_fn, variables, batch, accum, tx=tx)
    chex.assert_trees_all_close((acc.params, acc.opt_state), (whole.params, whole.opt_state),
                                rtol=2e-5, atol=2e-6)


def test_accumulation_with_an_in_loss_state_update_is_a_clear_error():
  model = tiny_vqvae()
  batch = {"image": images(4)}
  variables = model.init(jax.random.PRNGKey(0), batch["image"], train=False)
  with pytest.raises(ValueError, match="finalize_state"):
    one_step(vqvae_loss(model, False), variables, batch, 2)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    one_step(vqvae_loss(model, True), variables, batch, 3, vqvae_lib.finalize_codebooks(model))


def test_microbatches_are_strided_rows():
  x = jnp.arange(8)
  np.testing.assert_array_equal(step_lib.split_microbatches({"x": x}, 2)["x"],
                                [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_memory_plan_compiles_a_tiny_prior_at_full_depth():
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from helpers import ROOT  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import memory_plan  # pylint: disable=g-import-not-at-top
  config = memory_plan.load_config("imagenet256", "prior_top,tiny")
  with config.unlocked():
    config.priors.top.update(dict(num_layers=4, num_output_layers=4, attention_every=1))
    config.priors.top.train.batch_size = 4
  mesh = memory_plan.make_mesh(jax.devices()[:1], 1)
  r = memory_plan.planned_bytes(config, "prior", "top", "block", mesh, 2, config.axis_rules)
  for key in ("argument", "output", "temp", "peak"):
    assert r[key] > 0
  assert r["peak"] == r["argument"] + r["output"] - r["alias"] + r["temp"]
  assert r["fits_gb"] == [16, 32, 80, 141]
  line = memory_plan.format_row({"experiment": "x", "step": "prior_top", "batch": 4,
                                 "per_device_batch": 4, "per_device_micro": 2,
                                 "remat": "block", "fsdp": 1, "accum": 2, "compile_s": 1.0,
                                 **r})
  assert "16,32,80,141" in line


def test_prior_remat_keeps_the_attention_weights(capsys):
  """remat='block' saves the attention weights (models/remat.py SAVED_NAMES) rather than
  recomputing scores and softmax in the backward pass, which crashed XLA:TPU's compiler;
  the gated layers keep nothing of their own."""
  from jax.ad_checkpoint import print_saved_residuals  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.models.prior import PixelSNAILPrior  # pylint: disable=g-import-not-at-top
  prior = PixelSNAILPrior(num_codes=16, hidden=8, res_hidden=8, num_layers=2,
                          attention_every=1, num_heads=2, kernel_size=3, remat="block")
  codes = jnp.zeros((2, 4, 4), jnp.int32)
  params = prior.init(jax.random.key(0), codes, train=False)["params"]
  loss = lambda p: prior.apply({"params": p}, codes, train=True,
                               rngs={"dropout": jax.random.key(1)}).sum()
  print_saved_residuals(loss, params)
  saved = capsys.readouterr().out
  # [segments, B, heads, N, N]: both layers' softmax weights, stacked by the scan.
  assert "f32[2,2,2,16,16]" in saved, saved
