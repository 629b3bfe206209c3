"""The generic sampling loop's contract, with a fake decoder instead of a prior.

The fake's logits force a known sequence (each code is a function of the codes fed
before it, its position and the row's label), and it reports every call it gets to the
host, so the tests see the loop's order of calls, what had been fed at each step, the
logits `choose` receives and the temperature / top-k / top-p / guidance plumbing.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from jax.experimental import io_callback

from vqvae2_jax.sampling import draw as draw_lib
from vqvae2_jax.sampling.incremental import run_incremental, sample_incremental

K = 5
B, H, W = 2, 5, 3
EVENTS: list[tuple] = []  # host log of the fake's calls, in order


def _log(kind, index, span, fed):
  EVENTS.append((kind, int(index), int(span), np.asarray(fed).copy()))


def _report(kind: str, index, span, fed):
  io_callback(functools.partial(_log, kind), None, index, jnp.int32(span), fed,
              ordered=True)


@struct.dataclass
class FakeCache:
  fed: jax.Array  # int32 [B, H * W]: codes fed so far, -1 where none
  labels: jax.Array  # int32 [B]


def target(fed_before: np.ndarray, p: int) -> np.ndarray:
  """The code the fake's logits peak at: (sum of earlier codes + p) mod K, per row."""
  return (fed_before.sum(axis=-1) + p) % K


class ForcingDecoder(nn.Module):
  """Decoding interface of PixelSNAILPrior, no parameters: logits -|k - target| plus a
  label-dependent bump, row spans of two rows."""
  num_codes: int = K
  num_classes: int = 0
  null_label: bool = False
  num_cond_levels: int = 0

  @nn.nowrap
  def decode_row_spans(self, shape):
    return tuple((r, min(r + 2, shape[1])) for r in range(0, shape[1], 2))

  def init_cache(self, shape, cond_codes, labels, sharding):
    del cond_codes, sharding
    b, h, w = shape
    labels = jnp.zeros((b,), jnp.int32) if labels is None else labels
    return FakeCache(jnp.full((b, h * w), -1, jnp.int32), labels)

  def begin_row(self, cache, row):
    _report("row", row, -1, cache.fed)
    return cache

  def decode_step(self, cache, position, *, span):
    _report("step", position, span, cache.fed)
    fed = jnp.where(cache.fed >= 0, cache.fed, 0)
    tgt = (fed.sum(-1) + position) % K
    k = jnp.arange(K)
    logits = -jnp.abs(k[None] - tgt[:, None]).astype(jnp.float32)
    logits = logits + 0.5 * (k[None] == cache.labels[:, None] % K)
    return logits, cache

  def feed(self, cache, position, code, *, span):
    _report("feed", position, span, cache.fed)
    return cache.replace(fed=cache.fed.at[:, position].set(code))


def _expected_logits(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The fake's logits [B, H*W, K] at every position, given the codes fed [B, H*W]."""
  n = codes.shape[1]
  k = np.arange(K)
  out = np.zeros(codes.shape + (K,), np.float32)
  for p in range(n):
    tgt = target(codes[:, :p], p)
    out[:, p] = -np.abs(k[None] - tgt[:, None]) + 0.5 * (k[None] == labels[:, None] % K)
  return out


def _argmax(p, logits):
  del p
  return jnp.argmax(logits, -1).astype(jnp.int32)


def test_loop_calls_in_raster_order_and_feeds_only_the_past():
  EVENTS.clear()
  codes, logits = run_incremental(ForcingDecoder(), {}, shape=(B, H, W), choose=_argmax,
                                  return_logits=True)
  codes = np.asarray(codes).reshape(B, H * W)
  spans = {i: s for s, (r0, r1) in enumerate(ForcingDecoder().decode_row_spans((B, H, W)))
           for i in range(r0, r1)}
  want = []
  for i in range(H):
    want.append(("row", i, -1))
    for j in range(W):
      want += [("step", i * W + j, spans[i]), ("feed", i * W + j, spans[i])]
  assert [e[:3] for e in EVENTS] == want
  for kind, index, _, fed in EVENTS:
    first_unfed = index * W if kind == "row" else index
    # Causality: everything before is fed with the loop's codes, nothing after.
    np.testing.assert_array_equal(fed[:, :first_unfed], codes[:, :first_unfed])
    assert np.all(fed[:, first_unfed:] == -1), (kind, index)
  # argmax of the forcing logits: the known sequence, and the logits returned are the
  # ones the model computed.
  labels = np.zeros(B, np.int32)
  for p in range(H * W):
    np.testing.assert_array_equal(codes[:, p], target(codes[:, :p], p) % K)
  np.testing.assert_array_equal(np.asarray(logits).reshape(B, H * W, K),
                                _expected_logits(codes, labels))


def test_choose_receives_each_positions_logits_and_its_codes_are_fed():
  forced = np.random.default_rng(0).integers(0, K, (B, H * W)).astype(np.int32)
  seen = []

  def host(p, logits):
    seen.append((int(p), np.asarray(logits)))
    return forced[:, int(p)]

  def choose(p, logits):
    return io_callback(host, jax.ShapeDtypeStruct((B,), jnp.int32), p, logits, ordered=True)

  EVENTS.clear()
  codes = run_incremental(ForcingDecoder(), {}, shape=(B, H, W), choose=choose)
  np.testing.assert_array_equal(np.asarray(codes).reshape(B, -1), forced)
  assert [p for p, _ in seen] == list(range(H * W))
  want = _expected_logits(forced, np.zeros(B, np.int32))
  for p, logits in seen:
    np.testing.assert_array_equal(logits, want[:, p])
  last_fed = [fed for kind, _, _, fed in EVENTS if kind == "feed"][-1]
  np.testing.assert_array_equal(last_fed[:, :-1], forced[:, :-1])


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(top_k=3),
                                      dict(top_p=0.6, temperature=1.5)])
def test_sampling_draws_from_the_models_logits_with_the_shared_draw(settings):
  rng = jax.random.key(3)
  codes, logits = sample_incremental(ForcingDecoder(), {}, rng, shape=(B, H, W),
                                     return_logits=True, **settings)
  codes = np.asarray(codes).reshape(B, H * W)
  want = _expected_logits(codes, np.zeros(B, np.int32))
  np.testing.assert_array_equal(np.asarray(logits).reshape(B, H * W, K), want)
  kw = dict(temperature=settings.get("temperature", 1.0), top_k=settings.get("top_k", 0),
            top_p=settings.get("top_p", 1.0))
  for p in range(H * W):
    drawn = draw_lib.draw(rng, p, jnp.asarray(want[:, p]), **kw)
    np.testing.assert_array_equal(np.asarray(drawn), codes[:, p])
  assert len(np.unique(codes)) > 1


def test_guidance_runs_the_doubled_batch_and_feeds_both_rows_the_guided_draw():
  model = ForcingDecoder(num_classes=3, null_label=True)
  labels = np.array([1, 2], np.int32)
  rng, w = jax.random.key(4), 2.5
  EVENTS.clear()
  codes, logits = sample_incremental(model, {}, rng, shape=(B, H, W), labels=labels,
                                     guidance=w, return_logits=True)
  codes = np.asarray(codes).reshape(B, H * W)
  cond = _expected_logits(codes, labels)
  uncond = _expected_logits(codes, np.full(B, model.num_classes, np.int32))
  guided = uncond + w * (cond - uncond)
  np.testing.assert_allclose(np.asarray(logits).reshape(B, H * W, K), guided, rtol=1e-6)
  for p in range(H * W):
    drawn = draw_lib.draw(rng, p, jnp.asarray(guided[:, p]), 1.0, 0, 1.0)
    np.testing.assert_array_equal(np.asarray(drawn), codes[:, p])
  fed = [f for kind, _, _, f in EVENTS if kind == "feed"][-1]
  assert fed.shape[0] == 2 * B  # the doubled batch: row r and its null-label copy
  np.testing.assert_array_equal(fed[0::2, :-1], codes[:, :-1])
  np.testing.assert_array_equal(fed[1::2, :-1], codes[:, :-1])
