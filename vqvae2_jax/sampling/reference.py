"""Reference ancestral sampler: one full forward pass of the prior per position.

Slow (H * W teacher-forced passes per sample) but obviously correct; the incremental
sampler (`sampling/incremental.py`) must reproduce its codes exactly.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.sampling import draw as draw_lib, incremental


@functools.partial(jax.jit,
                   static_argnames=("prior", "shape", "top_k", "nucleus", "positions",
                                    "guided"))
def _sample(prior, params, rng, cond_codes, labels, temperature, top_p, guidance, *, shape,
            top_k, nucleus, positions, guided):
  b, hgt, wid = shape
  variables = {"params": params}
  if guided:  # one pass over [rows; null-label rows] interleaved (draw_lib.double_inputs)
    _, cond_codes, labels = draw_lib.double_inputs(prior, shape, cond_codes, labels)

  def body(p, codes):
    inputs = jnp.repeat(codes, 2, axis=0) if guided else codes
    logits = prior.apply(variables, inputs, cond_codes, labels, train=False)
    i, j = p // wid, p % wid
    logits_p = logits[:, i, j]
    if guided:
      logits_p = draw_lib.guided_logits(logits_p, guidance)
    code = draw_lib.draw(rng, p, logits_p, temperature, top_k, top_p, nucleus=nucleus)
    return codes.at[:, i, j].set(code)

  codes = jnp.zeros(shape, jnp.int32)
  return jax.lax.fori_loop(0, positions, body, codes)


def sample_reference(prior: PixelSNAILPrior, params: Any, rng: jax.Array, *,
                     shape: tuple[int, int, int], cond_codes: Sequence[jax.Array] = (),
                     labels: jax.Array | None = None, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, guidance: float = 1.0,
                     num_positions: int | None = None) -> jax.Array:
  """Raster-order ancestral sampling running the whole prior once per position.

  Args:
    prior: the prior module.
    params: its 'params' collection (boxed or plain).
    rng: PRNG key; position p uses jax.random.fold_in(rng, p).
    shape: (B, H, W) of the codes to sample.
    cond_codes: int32 [B, H/s, W/s] upper-level codes (top first); may be batch-sharded.
    labels: int32 [B] class labels (class-conditional priors only).
    temperature: softmax temperature (> 0).
    top_k: keep only the k most likely codes (0 = off).
    top_p: nucleus sampling mass (1.0 = off).
    guidance: classifier-free guidance scale w (1 = off, exactly plain sampling); != 1
      needs a prior with a null label (see draw_lib.guidance_active).
    num_positions: sample only the first n raster positions (the rest stay 0); for
      timing a subset of a long run. None = all H * W.

  Returns:
    int32 [B, H, W] codes.
  """
  shape = draw_lib.check_args(prior, shape, cond_codes, labels, temperature, top_k, top_p)
  guided = draw_lib.guidance_active(prior, guidance)
  n = shape[1] * shape[2] if num_positions is None else int(num_positions)
  return _sample(prior, draw_lib.plain_params(params), rng, tuple(cond_codes), labels,
                 jnp.float32(temperature), jnp.float32(top_p), jnp.float32(guidance),
                 shape=shape, top_k=top_k, nucleus=draw_lib.nucleus_active(top_p),
                 positions=n, guided=guided)


def has_incremental_loop(prior: Any) -> bool:
  """Whether the incremental sampler's cached loop runs `prior` (it has the decoding
  interface, as PixelSNAILPrior). Other priors with its call signature
  (models/public_pixelsnail.py) run the reference loops."""
  return incremental.has_decoding_interface(prior)


@functools.partial(jax.jit, static_argnames=("prior", "shape", "choose", "return_logits"))
def _run(prior, params, cond_codes, labels, *, shape, choose, return_logits):
  b, hgt, wid = shape
  logits_all = jnp.zeros((b, hgt, wid, prior.num_codes), jnp.float32)

  def body(p, carry):
    codes, logits_all = carry
    logits = prior.apply({"params": params}, codes, cond_codes, labels, train=False)
    i, j = p // wid, p % wid
    codes = codes.at[:, i, j].set(choose(p, logits[:, i, j]).astype(jnp.int32))
    if return_logits:
      logits_all = logits_all.at[:, i, j].set(logits[:, i, j])
    return codes, logits_all

  codes, logits_all = jax.lax.fori_loop(0, hgt * wid, body,
                                        (jnp.zeros(shape, jnp.int32), logits_all))
  return (codes, logits_all) if return_logits else codes


def run_reference(prior: Any, params: Any, *, shape: tuple[int, int, int],
                  cond_codes: Sequence[jax.Array] = (), labels: jax.Array | None = None,
                  choose, sharding: jax.sharding.Sharding | None = None,
                  return_logits: bool = False):
  """`incremental.run_incremental`'s contract (a pluggable per-position choice, the same
  logits in every run that chose the same codes before p) with one whole forward pass of
  the prior per position: the codec's loop for priors without an incremental one.

  choose: static, hashable (p int32 scalar, logits float32 [B, K]) -> int32 [B].
  sharding: accepted for the same signature; the batch follows the inputs' sharding.
  Returns int32 [B, H, W] codes, or (codes, float32 [B, H, W, K] logits) with
  return_logits.
  """
  del sharding
  shape = draw_lib.check_inputs(prior, shape, cond_codes, labels)
  return _run(prior, draw_lib.plain_params(params), tuple(cond_codes), labels, shape=shape,
              choose=choose, return_logits=bool(return_logits))
