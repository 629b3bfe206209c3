"""Float32 logits -> integer frequencies: the one rule both coder sides apply.

Arithmetic coding decodes correctly only if encoder and decoder use *identical* integer
models. Both sides get bit-identical float32 logits (the same compiled incremental loop,
the same batch layout) and then apply `quantize` here, a pure NumPy function of those
logits: float64 softmax, every code one unit, the remaining 2^PRECISION - K units handed
out by largest remainder (ties to the lower code index, a stable sort). No code ever gets
probability zero, so any code map can be coded, even one the prior finds impossible.
The floor caps a latent's cost at 24 bits: for codes the prior finds nearly impossible
(p < 2^-24) the stream is shorter than their NLL; for typical codes the quantization
costs ~0.001% (measured on the demo and Imagenette runs, see benchmarks/bench_codec.py).

`coder_weights` turns the frequencies into the float array constriction's `Categorical`
family receives so that its own fixed-point conversion reproduces them exactly: with
weights w = f - 1 that sum to 2^24 - K, constriction's fast quantizer (perfect=False)
computes left_cumulative(i) = floor(sum_{j<i} w_j * scale) + i with scale exactly 1.0,
i.e. sum_{j<i} f_j. All partial sums are integers below 2^24, exact in float32.
`tests/test_codec.py` checks the resulting code lengths against -log2(f / 2^24).
"""
from __future__ import annotations

import numpy as np

PRECISION = 24  # constriction's default model precision for its 32-bit-word coders
TOTAL = 1 << PRECISION


def quantize(logits: np.ndarray) -> np.ndarray:
  """Integer frequencies of float logits [B, K]: int64 [B, K], each >= 1, rows sum to 2^24.

  Deterministic on one platform (NumPy float64 exp and sum of the given float32 logits).
  Non-finite logits (a -inf mask) get the minimum of one unit.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or not 1 < logits.shape[1] < TOTAL // 2:
    raise ValueError(f"logits must be [B, K] with 1 < K < 2^{PRECISION - 1}, got "
                     f"{logits.shape}")
  finite = np.isfinite(logits)
  if not finite.any(axis=1).all():
    raise ValueError("a row of logits has no finite entry: no distribution to code with")
  shifted = np.where(finite, logits - np.max(np.where(finite, logits, -np.inf), axis=1,
                                             keepdims=True), -np.inf)
  probs = np.exp(shifted)
  probs /= probs.sum(axis=1, keepdims=True)
  free = TOTAL - logits.shape[1]
  scaled = probs * free
  base = np.floor(scaled).astype(np.int64)
  remainder = free - base.sum(axis=1)  # in [0, K): floor loses less than one unit per code
  order = np.argsort(-(scaled - base), axis=1, kind="stable")
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.arange(order.shape[1])[None], axis=1)
  return base + (ranks < remainder[:, None]) + 1


def coder_weights(freqs: np.ndarray) -> np.ndarray:
  """float32 [B, K] weights that make constriction's Categorical(perfect=False) use
  exactly `freqs` (see the module docstring)."""
  return (np.asarray(freqs, np.int64) - 1).astype(np.float32)


def code_length_bits(freqs: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """Ideal code length -log2(f[code] / 2^24) of codes int [B] under freqs [B, K]: [B]."""
  f = np.take_along_axis(np.asarray(freqs), np.asarray(codes)[:, None], axis=1)[:, 0]
  return PRECISION - np.log2(f.astype(np.float64))
