"""PixelSNAILPrior: causality, conditioning, likelihood, paper-size shapes, bf16."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqvae2_jax import config_lib
from vqvae2_jax.models import causal
from vqvae2_jax.models.prior import PixelSNAILPrior

from helpers import numpy_params

K = 8
TOP = dict(num_codes=K, hidden=16, res_hidden=16, num_layers=4, attention_every=2,
           num_heads=2, num_output_layers=1, num_classes=3, dropout=0.3, attn_dropout=0.3)
COND = dict(num_codes=K, hidden=16, res_hidden=16, num_layers=2, num_cond_layers=1,
            num_cond_levels=2, cond_scales=(4, 2))
# Forward passes use one batch size per model (the causality test's) so that tests share
# compiled functions through the `_forward` cache.
TOP_B, COND_B = 37, 65
UNCOND = dict(TOP, num_classes=0, num_layers=2, num_output_layers=0)
# Every parameter axis name has a rule (activations alone use "batch").
ALLOWED_AXES = {name for name, _ in config_lib.DEFAULT_AXIS_RULES} - {"batch"}


def _inputs(model, b, h, w, seed=0):
  rng = np.random.default_rng(seed)
  codes = jnp.asarray(rng.integers(0, model.num_codes, (b, h, w)), jnp.int32)
  cond = tuple(jnp.asarray(rng.integers(0, model.num_codes, (b, h // s, w // s)), jnp.int32)
               for s in model.cond_scales)
  labels = (jnp.asarray(rng.integers(0, model.num_classes, (b,)), jnp.int32)
            if model.num_classes else None)
  return codes, cond, labels


@functools.lru_cache(maxsize=None)
def _forward(model):
  """Jitted teacher-forced forward pass, cached per model so tests share compilations."""
  return jax.jit(lambda p, c, cc, lab: model.apply({"params": p}, c, cc, lab, train=False))


def dependence(model, forward, h, w):
  """[p, q]: how much the logits at raster position q move when the code at p changes.

  One batch of n + 1 maps: element p + 1 has the code at position p changed, element 0
  is the base map."""
  n = h * w
  codes, cond, labels = _inputs(model, 1, h, w)
  params = numpy_params(model, codes, cond, labels)
  flat = np.repeat(np.asarray(codes).reshape(1, n), n + 1, axis=0)
  flat[np.arange(1, n + 1), np.arange(n)] = (flat[np.arange(1, n + 1), np.arange(n)] + 1) % K
  rep = lambda x: None if x is None else jnp.repeat(x, n + 1, axis=0)
  logits = forward(params, jnp.asarray(flat.reshape(n + 1, h, w)),
                   tuple(rep(c) for c in cond), rep(labels))
  return np.abs(np.asarray(logits[1:] - logits[:1])).reshape(n, n, K).max(-1)


def expected_dependence(model, h, w):
  """bool [p, q]: the positions each logit must depend on, from the architecture.

  Every earlier position in raster order with attention (it sees them all). Without it,
  the causal receptive field of the two stacks, which has no blind spot: each of the
  L gated layers and the input convs reach R = (k // 2) (L + 1) in total, i.e. the
  R rows above q at column distance <= R, and the R positions left of q in its row.
  """
  r, c = np.divmod(np.arange(h * w), w)
  dr, dc = r[None, :] - r[:, None], c[None, :] - c[:, None]  # q's row/col minus p's
  before = (dr > 0) | ((dr == 0) & (dc > 0))
  if model.attention_every and model.num_layers >= model.attention_every:
    return before
  reach = (model.kernel_size // 2) * (model.num_layers + 1)
  return (((dr == 0) & (dc > 0) & (dc <= reach))
          | ((dr > 0) & (dr <= reach) & (np.abs(dc) <= reach)))


def assert_depends_exactly(model, forward, h, w):
  diff = dependence(model, forward, h, w)
  want = expected_dependence(model, h, w)
  # Outside the set the logits are bit-identical; inside, the smallest effect of a code
  # change on these random-parameter models is ~3e-5.
  got = diff > 1e-7
  leaks, blind = np.argwhere(got & ~want), np.argwhere(want & ~got)
  where = lambda pq: [(divmod(int(p), w), divmod(int(q), w)) for p, q in pq[:4]]
  assert not len(blind), f"blind spots: logits miss codes they must see (p, q): {where(blind)}"
  assert not len(leaks), f"logits depend on codes outside their causal field (p, q): {where(leaks)}"


# top_attn at 12x12: attention must link the pairs beyond the convs' reach (R = 10 rows).
@pytest.mark.parametrize("cfg,hw", [(TOP, (6, 6)), (TOP, (12, 12)), (COND, (8, 8))],
                         ids=["top_attn", "top_attn_far", "cond"])
def test_each_logit_depends_on_exactly_its_causal_field(cfg, hw):
  model = PixelSNAILPrior(**cfg)
  assert_depends_exactly(model, _forward(model), *hw)


def test_the_dependence_check_catches_a_blind_spot(monkeypatch):
  # The vertical stack with down-right kernels (the original PixelCNN's masked-conv
  # mistake) never sees the codes above and to the right of a position.
  original = causal.conv_padding
  monkeypatch.setattr(causal, "conv_padding", lambda mode, k: original(
      "down_right" if mode == "down" else mode, k))
  model = PixelSNAILPrior(**COND)
  forward = jax.jit(lambda p, c, cc, lab: model.apply({"params": p}, c, cc, lab, train=False))
  with pytest.raises(AssertionError, match="blind spots"):
    assert_depends_exactly(model, forward, 8, 8)


def test_conditioning_and_labels_are_used():
  cond_model = PixelSNAILPrior(**COND)
  codes, cond, _ = _inputs(cond_model, COND_B, 8, 8)
  params = numpy_params(cond_model, codes, cond, None)
  fwd = _forward(cond_model)
  base = fwd(params, codes, cond, None)
  for u in range(2):
    changed = list(cond)
    changed[u] = (changed[u] + 1) % K
    assert np.abs(np.asarray(fwd(params, codes, tuple(changed), None) - base)).max() > 1e-3

  top = PixelSNAILPrior(**TOP)
  codes, _, labels = _inputs(top, TOP_B, 6, 6)
  params = numpy_params(top, codes, (), labels)
  fwd = _forward(top)
  other = (labels + 1) % top.num_classes
  assert np.abs(np.asarray(fwd(params, codes, (), other) - fwd(params, codes, (), labels))
                ).max() > 1e-3
  with pytest.raises(ValueError, match="class-conditional"):
    jax.eval_shape(lambda: top.apply({"params": params}, codes, train=False))

  uncond = PixelSNAILPrior(**UNCOND)
  params = numpy_params(uncond, codes, (), None)
  fwd = _forward(uncond)
  np.testing.assert_array_equal(fwd(params, codes, (), None), fwd(params, codes, (), labels))


def test_argument_errors():
  model = PixelSNAILPrior(**COND)
  codes, cond, _ = _inputs(model, 1, 8, 8)
  with pytest.raises(ValueError, match="upper-level code maps"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), codes, cond[:1], train=False))
  with pytest.raises(ValueError, match="must be"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), codes, (cond[1], cond[1]),
                                      train=False))
  with pytest.raises(ValueError, match="kernel_size"):
    jax.eval_shape(lambda: PixelSNAILPrior(**dict(TOP, kernel_size=4)).init(
        jax.random.key(0), codes, (), jnp.zeros((1,), jnp.int32), train=False))


def test_params_carry_logical_axis_names():
  model = PixelSNAILPrior(**dict(COND, num_classes=3, attention_every=1))
  codes, cond, _ = _inputs(model, 1, 8, 8)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), codes, cond,
                                            jnp.zeros((1,), jnp.int32), train=False))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= ALLOWED_AXES, leaf.names
    assert leaf.value.dtype == jnp.float32


def test_init_nll_near_log_k_and_overfits_a_few_maps():
  model = PixelSNAILPrior(num_codes=K, hidden=16, res_hidden=16, num_layers=2, kernel_size=3,
                          num_classes=4, dropout=0.0)
  rng = np.random.default_rng(0)
  codes = jnp.asarray(rng.integers(0, K, (4, 6, 6)), jnp.int32)
  labels = jnp.arange(4, dtype=jnp.int32)  # distinct labels: every map is predictable
  # An rbg key: its init kernels compile much faster on CPU than threefry's.
  params = jax.jit(lambda key: model.init(key, codes, (), labels, train=False))(
      jax.random.key(0, impl="unsafe_rbg"))["params"]

  def nll(p):
    logits = model.apply({"params": p}, codes, (), labels, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), codes[..., None], -1))

  assert abs(float(jax.jit(nll)(params)) - math.log(K)) < 0.05
  opt = optax.adam(1e-2)

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(nll)(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss
    (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), None, length=100)
    return p, losses

  params, losses = train(params)
  assert float(losses[-1]) < 0.05, f"final NLL {float(losses[-1])}"


PAPER = {
    # Table 3 (ImageNet-256).
    "imagenet_top": (dict(hidden=512, res_hidden=2048, num_layers=20, attention_every=5,
                          num_heads=8, dropout=0.1, num_output_layers=20, num_classes=1000),
                     32, ()),
    "imagenet_bottom": (dict(hidden=512, res_hidden=1024, num_layers=20, dropout=0.1,
                             num_cond_layers=20, num_cond_levels=1, cond_scales=(2,),
                             num_classes=1000), 64, (32,)),
    # Table 4 (FFHQ-1024).
    "ffhq_top": (dict(hidden=512, res_hidden=2048, num_layers=20, attention_every=5,
                      num_heads=8, dropout=0.5), 32, ()),
    "ffhq_mid": (dict(hidden=512, res_hidden=1024, num_layers=20, attention_every=20,
                      num_heads=8, dropout=0.3, num_cond_layers=8, num_cond_levels=1,
                      cond_scales=(2,)), 64, (32,)),
    "ffhq_bottom": (dict(hidden=512, res_hidden=1024, num_layers=10, dropout=0.25,
                         num_cond_layers=8, num_cond_levels=2, cond_scales=(4, 2)),
                    128, (32, 64)),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_size_priors_shape_check(name):
  cfg, size, upper = PAPER[name]
  model = PixelSNAILPrior(num_codes=512, kernel_size=5, dtype=jnp.bfloat16, **cfg)
  codes = jax.ShapeDtypeStruct((2, size, size), jnp.int32)
  cond = tuple(jax.ShapeDtypeStruct((2, s, s), jnp.int32) for s in upper)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32) if model.num_classes else None
  variables = jax.eval_shape(lambda c, cc, lab: model.init(jax.random.key(0), c, cc, lab,
                                                           train=False), codes, cond, labels)
  logits = jax.eval_shape(lambda v, c, cc, lab: model.apply(v, c, cc, lab, train=True,
                                                            rngs={"dropout": jax.random.key(1)}),
                          variables, codes, cond, labels)
  assert logits.shape == (2, size, size, 512) and logits.dtype == jnp.float32
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(variables)))
  print(f"{name}: {count / 1e6:.1f}M parameters")
  assert 50e6 < count < 500e6


def test_bf16_compute_gives_finite_float32_logits():
  model = PixelSNAILPrior(**dict(UNCOND, dtype=jnp.bfloat16))
  codes, _, _ = _inputs(model, TOP_B, 6, 6)
  params = numpy_params(model, codes, (), None)
  logits = _forward(model)(params, codes, (), None)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
  ref = _forward(PixelSNAILPrior(**UNCOND))(params, codes, (), None)
  assert np.abs(np.asarray(logits - ref)).max() < 0.1 * np.abs(np.asarray(ref)).max() + 0.1


def test_runs_recorded_before_scan_layers_keep_the_unrolled_layout(tmp_path):
  """A prior record without `scan_layers` (written before the field) resolves to False,
  the layout its checkpoints hold, although today's default is True; a record with the
  field keeps its value."""
  import json  # pylint: disable=g-import-not-at-top
  from helpers import load_config  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top
  config = load_config("imagenet256", "prior_top,tiny")
  assert config.priors.top.scan_layers
  workdir = Workdir(str(tmp_path))
  workdir.write_config("prior_top", config)
  (tmp_path / "prior_top" / "checkpoints" / "1").mkdir(parents=True)
  assert workdir.resolve_recorded(config).priors.top.scan_layers
  path = tmp_path / "prior_top" / "config.json"
  record = json.loads(path.read_text())
  del record["priors"]["top"]["scan_layers"]
  path.write_text(json.dumps(record))
  assert not workdir.resolve_recorded(config).priors.top.scan_layers
