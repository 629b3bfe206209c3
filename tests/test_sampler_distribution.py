"""The samplers' draws follow the prior's (filtered) softmax, at every position.

The incremental sampler draws 2,048 maps (8 keys x 256 rows) from a small class-conditional
prior with attention; the reference sampler draws the same codes for the first key
(so the statistics hold for its draws too; it costs H * W full forward passes per draw). For every position p and code k, the count of draws with x_p = k must
match the sum over draws of the model's probability of k given that draw's earlier codes
(teacher-forced logits, the same filter), within a binomial tolerance: the count is a sum
of independent Bernoullis with mean sum_i P_ip(k) and variance sum_i P_ip(k) (1 - P_ip(k));
rare codes, where the normal approximation fails, are pooled per position and judged by
their Poisson tail. Codes the filter removes must never be drawn. The same statistic rejects
the draws when judged against a softmax at the wrong temperature, so it can fail.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.sampling import draw as draw_lib
from vqvae2_jax.sampling.incremental import sample_incremental
from vqvae2_jax.sampling.reference import sample_reference

from helpers import numpy_params

K, H, W, ROWS, KEYS, REFERENCE_KEYS = 8, 3, 3, 256, 8, 1
MODEL = dict(num_codes=K, hidden=16, res_hidden=16, num_layers=2, attention_every=1,
             num_heads=2, num_output_layers=1, num_classes=3, dropout=0.0, attn_dropout=0.0)
# Each count against its expectation at |z| < 4.4 (two-sided p > 1e-5): with ~80 tests
# a correct sampler fails with probability < 1e-3 (and the seeds are fixed).
P_MIN = 1e-5
SAMPLERS = {"reference": sample_reference, "incremental": sample_incremental}
SETTINGS = {"plain": dict(temperature=1.0, top_k=0, top_p=1.0),
            "filtered": dict(temperature=0.8, top_k=6, top_p=0.9)}


@functools.lru_cache(maxsize=None)
def _setup():
  model = PixelSNAILPrior(**MODEL)
  labels = jnp.asarray(np.arange(ROWS) % 3, jnp.int32)
  params = numpy_params(model, jnp.zeros((ROWS, H, W), jnp.int32), (), labels, seed=3)
  forward = jax.jit(lambda p, c, lab: model.apply({"params": p}, c, (), lab, train=False))
  return model, params, labels, forward


def _codes(sampler: str, setting: str, keys: int) -> np.ndarray:
  """int32 [keys * ROWS, H, W] drawn with keys 100, 101, ..."""
  model, params, labels, _ = _setup()
  return np.concatenate([np.asarray(SAMPLERS[sampler](
      model, params, jax.random.key(100 + key), shape=(ROWS, H, W), labels=labels,
      **SETTINGS[setting])) for key in range(keys)])


def probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float
                  ) -> np.ndarray:
  """Softmax of the sampler's filter of logits [..., K]."""
  flat = jnp.asarray(logits.reshape(-1, K))
  return np.asarray(jax.nn.softmax(draw_lib.filter_logits(flat, temperature, top_k, top_p),
                                   -1)).reshape(logits.shape)


@functools.lru_cache(maxsize=None)
def _draws(setting: str):
  """Incremental draws [KEYS * ROWS, H, W] and their teacher-forced logits [..., K] at
  each position given the draw's earlier codes."""
  model, params, labels, forward = _setup()
  codes = _codes("incremental", setting, KEYS)
  logits = np.concatenate([np.asarray(forward(params, jnp.asarray(c), labels))
                           for c in np.split(codes, KEYS)])
  return codes, logits


def _poisson_p_value(observed: int, mean: float) -> float:
  """Two-sided tail probability of `observed` under Poisson(mean)."""
  if mean <= 0:
    return 1.0 if observed == 0 else 0.0
  log_pmf = lambda j: j * math.log(mean) - mean - math.lgamma(j + 1)
  below = sum(math.exp(log_pmf(j)) for j in range(observed + 1))
  above = 1.0 - below + math.exp(log_pmf(observed))
  return min(1.0, 2 * min(below, above))


def p_values(codes: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """Two-sided p-values of the observed counts under the model, one per test.

  Per (position, code) with >= 10 expected draws of it and of the other codes: the normal
  approximation of the count's distribution (a sum of independent Bernoullis, mean
  sum_i P_ik, variance sum_i P_ik (1 - P_ik)). The rarer codes of a position, where that
  approximation fails, are pooled into one count judged by its Poisson tail.
  """
  n = len(codes)
  onehot = np.eye(K)[codes.reshape(n, -1)]  # [N, H*W, K]
  p = probs.reshape(n, -1, K).astype(np.float64)
  observed, expected, var = onehot.sum(0), p.sum(0), (p * (1 - p)).sum(0)
  common = (expected >= 10) & (n - expected >= 10)
  z = np.abs(observed - expected)[common] / np.sqrt(var[common])
  values = [math.erfc(v / math.sqrt(2)) for v in z]
  for pos in range(observed.shape[0]):
    rare = ~common[pos]
    values.append(_poisson_p_value(int(observed[pos, rare].sum()),
                                   float(expected[pos, rare].sum())))
  return np.asarray(values)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_draws_follow_the_softmax(setting):
  opts = SETTINGS[setting]
  codes, logits = _draws(setting)
  probs = probabilities(logits, **opts)
  worst = p_values(codes, probs).min()
  assert worst > P_MIN, f"{setting}: counts off the softmax (smallest p-value {worst:.2g})"
  # Filtered-out codes (probability exactly 0) are never drawn.
  assert np.take_along_axis(probs, codes[..., None], -1).min() > 0
  # The test has power: the conditionals are far from uniform, and the same draws judged
  # against the softmax at another temperature fail it.
  assert probs.max(-1).mean() > 2.0 / K
  wrong = probabilities(logits, **dict(opts, temperature=1.5 * opts["temperature"]))
  assert p_values(codes, wrong).min() < P_MIN


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_reference_sampler_draws_the_same_codes(setting):
  # Key by key the reference sampler's draws are the incremental's, so they follow the
  # softmax too.
  np.testing.assert_array_equal(_codes("reference", setting, REFERENCE_KEYS),
                                _draws(setting)[0][:REFERENCE_KEYS * ROWS])
