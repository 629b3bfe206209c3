"""Code length of images' latents under the priors, from one teacher-forced pass per level.

This is the number of bits the codec spends on an image's *lossy latents* (its stage-1
codes), -log2 p(codes), not a likelihood of the pixels: VQ-VAE-2 has no pixel density,
and images with equal codes get equal code lengths whatever their pixels.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vqvae2_jax.eval import likelihood as likelihood_lib


def make_level_bits_fn(priors: Mapping[str, tuple[Any, Any]]) -> Callable:
  """fn(*codes, labels) -> tuple of float32 [B] bits per image, one per level (top first).

  codes: int32 [B, H_l, W_l] per level, top first; labels: int32 [B] (ignored by
  unconditional priors). One teacher-forced prior pass per level (eval/likelihood.py).
  """
  levels = tuple(priors)
  fns = {l: likelihood_lib.make_nll_fn(priors[l][0], l, levels[:i])
         for i, l in enumerate(levels)}

  def bits(*arrays):
    *codes, labels = arrays
    batch = dict(zip(levels, codes), label=labels)
    out = []
    for level, c in zip(levels, codes):
      nll, _ = fns[level](priors[level][1], batch)  # mean nats per latent [B]
      out.append(nll * (c.shape[1] * c.shape[2] / math.log(2)))
    return tuple(out)
  return bits


def code_length(per_label: Callable[[np.ndarray], Sequence[np.ndarray]], n: int, *,
                levels: Sequence[str], labels: np.ndarray | None, num_classes: int,
                image_size: int) -> dict[str, Any]:
  """Bits of n images' latents, per level and in total.

  Args:
    per_label: labels int32 [n] -> float [n] bits per level (top first) given those labels.
    n: number of images.
    levels: level names, top first.
    labels: int32 [n] class labels, or None. With class-conditional priors and no
      labels, the code length is that of the mixture over classes with a uniform class
      prior, -log2 sum_c p(c) p(codes | c) (one pass per class and level); the reported
      per-level bits and `label` are those of the most likely class.
    num_classes: classes of the conditional priors (0 when unconditional).
    image_size: S, for bits per pixel (S*S pixels) and per dimension (3*S*S).

  Returns:
    {'bits': float64 [n], 'levels': {level: float64 [n]}, 'bits_per_pixel': [n],
     'bits_per_dim': [n], 'label': int32 [n] or None}.
  """
  if num_classes and labels is None:
    table = np.stack([np.stack(per_label(np.full(n, c, np.int32))).astype(np.float64)
                      for c in range(num_classes)])  # [C, L, n]
    totals = table.sum(axis=1)  # [C, n]
    best = np.argmin(totals, axis=0)
    # -log2 (1/C) sum_c 2^-bits_c, computed stably around the smallest bits.
    low = totals.min(axis=0)
    total = low - np.log2(np.exp2(low - totals).sum(axis=0)) + math.log2(num_classes)
    per_level = table[best, :, np.arange(n)].T  # [L, n]
    label = best.astype(np.int32)
  else:
    label = None if not num_classes else np.broadcast_to(np.asarray(labels, np.int32), (n,))
    if label is not None and ((label < 0) | (label >= num_classes)).any():
      raise ValueError(f"labels must be classes of these priors (0..{num_classes - 1}), got "
                       f"{sorted(set(label[(label < 0) | (label >= num_classes)].tolist()))}")
    arg = np.zeros(n, np.int32) if label is None else label
    per_level = np.stack(per_label(arg)).astype(np.float64)
    total = per_level.sum(axis=0)
  return {"bits": total, "levels": dict(zip(levels, per_level)),
          "bits_per_pixel": total / image_size**2,
          "bits_per_dim": total / (3 * image_size**2), "label": label}
