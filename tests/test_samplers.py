"""Reference vs incremental sampler: same codes, same logits, sharded = unsharded."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import io_callback
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.sampling import draw as draw_lib
from vqvae2_jax.sampling.incremental import run_incremental, sample_incremental
from vqvae2_jax.sampling.reference import sample_reference

from helpers import numpy_params

K = 8
CASES = {
    # Top prior: two attention layers (one cache each), output stack, classes; sampled with
    # temperature, top-k and top-p all active.
    "top_attn_classes": dict(
        model=dict(num_codes=K, hidden=16, res_hidden=16, num_layers=2, attention_every=1,
                   num_heads=2, num_output_layers=1, num_classes=3),
        hw=(6, 6), batch=2, sample=dict(temperature=0.8, top_k=5, top_p=0.9)),
    # Bottom prior: conditioned on one upper level and the class (batch 8: also sharded).
    "cond_classes": dict(
        model=dict(num_codes=K, hidden=16, res_hidden=16, num_layers=1, num_cond_layers=1,
                   num_cond_levels=1, cond_scales=(2,), num_classes=3),
        hw=(6, 6), batch=8, sample={}),
    # Mid/bottom-like prior without classes: two upper levels and one attention layer.
    "cond_two_levels_attn": dict(
        model=dict(num_codes=K, hidden=16, res_hidden=16, num_layers=2, attention_every=2,
                   num_heads=2, num_cond_layers=1, num_cond_levels=2, cond_scales=(4, 2)),
        hw=(8, 8), batch=2, sample=dict(temperature=1.3)),
}


@functools.lru_cache(maxsize=None)
def _case(name):
  """Model, params, inputs and both samplers' (unsharded) outputs for a case."""
  case = CASES[name]
  model = PixelSNAILPrior(**case["model"])
  b, (h, w) = case["batch"], case["hw"]
  rng = np.random.default_rng(1)
  cond = tuple(jnp.asarray(rng.integers(0, K, (b, h // s, w // s)), jnp.int32)
               for s in model.cond_scales)
  labels = (jnp.asarray(rng.integers(0, model.num_classes, (b,)), jnp.int32)
            if model.num_classes else None)
  params = numpy_params(model, jnp.zeros((b, h, w), jnp.int32), cond, labels)
  kw = dict(shape=(b, h, w), cond_codes=cond, labels=labels, **case["sample"])
  key = jax.random.key(7)
  ref = sample_reference(model, params, key, **kw)
  inc, inc_logits = sample_incremental(model, params, key, return_logits=True, **kw)
  return model, params, cond, labels, kw, ref, inc, inc_logits


@pytest.mark.parametrize("name", list(CASES))
def test_incremental_matches_reference_and_full_forward(name):
  model, params, cond, labels, _, ref, inc, inc_logits = _case(name)
  np.testing.assert_array_equal(np.asarray(inc), np.asarray(ref))
  codes = np.asarray(inc)
  assert codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < K
  assert len(np.unique(codes)) > 2, "samples collapsed to a constant"
  full = jax.jit(functools.partial(model.apply, train=False))({"params": params}, inc, cond,
                                                              labels)
  np.testing.assert_allclose(np.asarray(inc_logits), np.asarray(full), rtol=1e-4, atol=1e-4)


def test_sharded_batch_gives_the_same_codes():
  model, params, cond, labels, kw, ref, inc, _ = _case("cond_classes")
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py should provide 8 fake CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  batch = NamedSharding(mesh, P("data"))
  kw = dict(kw, cond_codes=tuple(jax.device_put(c, batch) for c in cond),
            labels=jax.device_put(labels, batch))
  key = jax.random.key(7)
  ref_sharded = sample_reference(model, params, key, **kw)
  inc_sharded = sample_incremental(model, params, key, sharding=batch, **kw)
  np.testing.assert_array_equal(np.asarray(ref_sharded), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(inc_sharded), np.asarray(inc))
  assert inc_sharded.sharding.is_equivalent_to(batch, 3)


def test_other_rng_gives_other_codes():
  model, params, _, _, kw, _, inc, _ = _case("top_attn_classes")
  other, _ = sample_incremental(model, params, jax.random.key(8), return_logits=True, **kw)
  assert np.any(np.asarray(other) != np.asarray(inc))


@pytest.mark.parametrize("name", ["top_attn_classes", "cond_two_levels_attn"])
def test_run_incremental_io_callback_choose_sees_teacher_forced_logits(name):
  """The codec's use: an ordered io_callback choose returning known codes. They must come
  back unchanged, positions must arrive in raster order, and the logits handed to the
  host must be the teacher-forced prior's (and bit-identical across runs)."""
  model, params, cond, labels, kw, *_ = _case(name)
  b, h, w = kw["shape"]
  forced = np.random.default_rng(3).integers(0, K, (b, h, w)).astype(np.int32)
  flat = forced.reshape(b, h * w)

  seen = []

  def host(p, logits):
    seen.append((int(p), np.asarray(logits)))
    return flat[:, int(p)]

  def choose(p, logits):  # one function for both runs: the second reuses the compilation
    return io_callback(host, jax.ShapeDtypeStruct((b,), jnp.int32), p, logits,
                       ordered=True)

  def run():
    seen.clear()
    codes, logits = run_incremental(model, params, shape=(b, h, w), cond_codes=cond,
                                    labels=labels, choose=choose, return_logits=True)
    return np.asarray(codes), np.asarray(logits), list(seen)

  codes, logits, first = run()
  np.testing.assert_array_equal(codes, forced)
  assert [p for p, _ in first] == list(range(h * w))
  host_logits = np.stack([lg for _, lg in first], axis=1).reshape(b, h, w, K)
  np.testing.assert_array_equal(host_logits, logits)
  full = model.apply({"params": params}, jnp.asarray(forced), cond, labels, train=False)
  np.testing.assert_allclose(host_logits, np.asarray(full), rtol=1e-5, atol=1e-5)
  _, _, second = run()
  assert len(second) == h * w
  for (_, a), (_, b_) in zip(first, second):
    np.testing.assert_array_equal(a, b_)


def test_bf16_incremental_sampler_runs():
  model, params, _, _, kw, _, inc, _ = _case("cond_classes")
  bf16 = PixelSNAILPrior(**dict(CASES["cond_classes"]["model"], dtype=jnp.bfloat16))
  codes, logits = sample_incremental(bf16, params, jax.random.key(7), return_logits=True, **kw)
  assert codes.dtype == jnp.int32 and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  assert np.asarray(codes).min() >= 0 and np.asarray(codes).max() < K


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
  filt = jax.jit(draw_lib.filter_logits, static_argnames="top_k")
  keep = lambda **kw: np.isfinite(np.asarray(filt(logits, **kw)))[0].tolist()
  assert keep(temperature=1.0, top_k=0, top_p=1.0) == [True] * 4
  assert keep(temperature=1.0, top_k=2, top_p=1.0) == [True, True, False, False]
  assert keep(temperature=1.0, top_k=0, top_p=0.7) == [True, True, False, False]
  assert keep(temperature=1.0, top_k=0, top_p=0.8) == [True, True, False, False]
  assert keep(temperature=1.0, top_k=0, top_p=0.81) == [True, True, True, False]
  assert keep(temperature=1.0, top_k=0, top_p=0.1) == [True, False, False, False]
  # Tiny probabilities survive top_p = 1 even when the cumulative sum rounds to 1.
  tiny = jnp.array([[0.0, -40.0]], jnp.float32)
  assert np.all(np.isfinite(np.asarray(filt(tiny, 1.0, 0, 1.0))))
  scaled = filt(logits, temperature=2.0, top_k=0, top_p=1.0)
  np.testing.assert_allclose(scaled, logits / 2.0)


def test_sampler_argument_errors():
  model, params, cond, labels, kw, *_ = _case("cond_classes")
  for bad, match in [(dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
                     (dict(top_k=-1), "top_k"), (dict(cond_codes=()), "upper-level"),
                     (dict(labels=None), "class-conditional"), (dict(shape=(8, 6)), "shape")]:
    for fn in (sample_reference, sample_incremental):
      with pytest.raises(ValueError, match=match):
        fn(model, params, jax.random.key(0), **dict(kw, **bad))
