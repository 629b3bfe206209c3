"""Sampling draws shared by the reference and the incremental sampler.

Both samplers draw position p (raster index i * W + j) with exactly the same function,
`draw(rng, p, logits, ...)`, using the key `jax.random.fold_in(rng, p)`; so with the same
rng they produce the same codes whenever their logits agree.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def nucleus_active(top_p: Any) -> bool:
  """False only when top_p is a Python number >= 1 (nucleus filtering statically off);
  a traced or array top_p keeps the filter (it is exact at top_p = 1 too)."""
  return not (isinstance(top_p, (int, float)) and top_p >= 1.0)


def filter_logits(logits: jax.Array, temperature: jax.Array | float, top_k: int,
                  top_p: jax.Array | float, *, nucleus: bool = True) -> jax.Array:
  """Temperature, then top-k, then nucleus (top-p) filtering.

  Args:
    logits: float32 [B, K].
    temperature: > 0 scalar; logits are divided by it.
    top_k: keep the k largest logits (0 = off). A Python int (static).
    top_p: keep the smallest set of most likely codes whose probability mass reaches
      top_p (1.0 = off); the most likely code is always kept.
    nucleus: static; False skips the top-p step (a sort of [B, K], the costliest part of
      a sampling step). At top_p >= 1 the step removes nothing, so False gives
      bit-identical logits there; use `nucleus_active(top_p)`.

  Returns:
    float32 [B, K] with removed codes set to -inf.
  """
  logits = logits.astype(jnp.float32) / temperature
  num_codes = logits.shape[-1]
  if 0 < top_k < num_codes:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if not nucleus:
    return logits
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # top_p >= 1 must keep everything, even codes whose mass rounds away in the cumsum.
  keep = (mass_before < top_p) | (jnp.asarray(top_p) >= 1.0)
  keep = keep.at[..., 0].set(True)
  # The smallest kept logit is the threshold; ties at the threshold are all kept.
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def draw(rng: jax.Array, position: jax.Array | int, logits: jax.Array,
         temperature: jax.Array | float, top_k: int, top_p: jax.Array | float, *,
         nucleus: bool = True) -> jax.Array:
  """Samples one code per batch row at raster `position`: logits float32 [B, K] -> int32 [B].

  `nucleus` as in `filter_logits` (static)."""
  key = jax.random.fold_in(rng, position)
  filtered = filter_logits(logits, temperature, top_k, top_p, nucleus=nucleus)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def plain_params(params: Any) -> Any:
  """Accepts a prior's 'params' collection (boxed or not, or {'params': ...}); returns
  the unboxed 'params' collection."""
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    params = params["params"]
  return nn.meta.unbox(params)


def check_inputs(prior: Any, shape: Sequence[int], cond_codes: Sequence[Any],
                 labels: Any) -> tuple[int, int, int]:
  """Validates the code shape and the conditioning inputs; returns shape as (B, H, W)."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"shape must be (B, H, W) with positive entries, got {shape}")
  if len(tuple(cond_codes)) != prior.num_cond_levels:
    raise ValueError(f"this prior needs {prior.num_cond_levels} upper-level code maps, got "
                     f"{len(tuple(cond_codes))}")
  if prior.num_classes and labels is None:
    raise ValueError("this prior is class-conditional: pass labels int32 [B]")
  return shape


def check_args(prior: Any, shape: Sequence[int], cond_codes: Sequence[Any], labels: Any,
               temperature: float, top_k: int, top_p: float) -> tuple[int, int, int]:
  """Validates sampler arguments; returns shape as a tuple (B, H, W)."""
  shape = check_inputs(prior, shape, cond_codes, labels)
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be a non-negative Python int (0 = off), got {top_k!r}")
  if isinstance(top_p, (int, float)) and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  return shape


# ---- classifier-free guidance (shared by both samplers) ----
#
# A guided step runs the prior once on a doubled batch that interleaves each row with
# its null-label copy (rows 2r: label y_r, rows 2r+1: the null label), so a row and its
# copy stay on the same device under batch sharding; the guided logits of row r are
# l_uncond + w * (l_cond - l_uncond), one code is drawn per row r and written to both.


def guidance_active(prior: Any, guidance: float) -> bool:
  """Whether sampling `prior` at scale `guidance` doubles the batch (False at w = 1:
  plain conditional sampling, bit for bit). Raises if w != 1 but the prior has no null
  label to guide against."""
  guidance = float(guidance)
  if guidance < 0:
    raise ValueError(f"guidance must be >= 0 (1 = off), got {guidance}")
  if guidance == 1.0:
    return False
  if not (prior.num_classes and getattr(prior, "null_label", False)):
    raise ValueError(f"guidance={guidance} needs a class-conditional prior trained with "
                     "label_dropout > 0 (it has no null label); use guidance=1")
  return True


def double_inputs(prior: Any, shape: tuple[int, int, int], cond_codes: Sequence[Any],
                  labels: Any) -> tuple[tuple[int, int, int], tuple[Any, ...], Any]:
  """(B, H, W), cond_codes [B, ...], labels [B] -> the interleaved doubled batch:
  (2B, H, W), each cond map repeated row-wise [2B, ...], labels [2B] = (y_0, null, ...)."""
  b = shape[0]
  cond2 = tuple(jnp.repeat(c, 2, axis=0) for c in cond_codes)
  null = jnp.full((b,), prior.num_classes, jnp.int32)
  labels2 = jnp.stack([jnp.asarray(labels, jnp.int32), null], axis=1).reshape(2 * b)
  return (2 * b,) + tuple(shape[1:]), cond2, labels2


def guided_logits(logits2: jax.Array, guidance: jax.Array | float) -> jax.Array:
  """Interleaved doubled logits float32 [2B, ..., K] -> guided float32 [B, ..., K]."""
  pairs = logits2.reshape((logits2.shape[0] // 2, 2) + logits2.shape[1:])
  cond, uncond = pairs[:, 0], pairs[:, 1]
  return uncond + guidance * (cond - uncond)
