"""Incremental (cached) ancestral sampling: a generic raster-order loop over a decoder.

The loop knows nothing of the model's layers. It drives any Linen module with the
decoding interface of `PixelSNAILPrior` (models/prior.py, models/prior_decoding.py),
called through `model.apply(variables, ..., method=...)`:

  model.decoding_view(params) -> (model, params)     optional: the layout to decode with
  model.decode_row_spans((B, H, W)) -> ((r0, r1), ...)  static row spans, in order
  init_cache(shape, cond_codes, labels, sharding) -> cache   (any pytree)
  begin_row(cache, i) -> cache                      all rows < i fed
  decode_step(cache, p, span=s) -> (logits float32 [B, K], cache)   codes < p fed
  feed(cache, p, code, span=s) -> cache             code int32 [B] chosen at p

For every span s, every row i in it and every column j (p = i * W + j), the loop calls
decode_step, `choose(p, logits)`, then feed with the chosen code; it keeps the canvas
(and, with return_logits, every position's logits). What each position costs, and all
caching, is the model's business (one forward pass per sample in all for the prior).

Per-position choice is pluggable (`run_incremental(..., choose=...)`): sampling plugs in
the temperature / top-k / top-p draw; the entropy codec plugs in an ordered io_callback.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from vqvae2_jax.sampling import draw as draw_lib

Choose = Callable[[jax.Array, jax.Array], jax.Array]
# The methods a model needs for this loop (`decoding_view` is optional).
DECODING_INTERFACE = ("decode_row_spans", "init_cache", "begin_row", "decode_step", "feed")
# Named scopes of the loop's own work (benchmarks/profile_sampling.py groups by them).
PROFILE_SCOPES = ("choose",)


def has_decoding_interface(model: Any) -> bool:
  """Whether `decode_loop` can drive `model` (all of DECODING_INTERFACE)."""
  return all(callable(getattr(model, name, None)) for name in DECODING_INTERFACE)


@struct.dataclass
class LoopState:
  """The loop's carry: the model's cache, the canvas and (optionally) the logits.

  codes: int32 [B, H * W] (0 where not chosen yet); logits: float32 [B, H * W, K] or None.
  """
  cache: Any
  codes: jax.Array
  logits: jax.Array | None


def decode_loop(model, params, cond_codes, labels, *, shape, choose, sharding,
                return_logits):
  """The traced sampling loop (call inside jit). Returns codes [B, H, W] [, logits]."""
  if hasattr(model, "decoding_view"):
    model, params = model.decoding_view(params)
  variables = {"params": params}
  b, hgt, wid = shape

  def call(method, *args, **kwargs):
    return model.apply(variables, *args, method=method, **kwargs)

  def constrain(x):
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)

  cache = call("init_cache", shape, cond_codes, labels, sharding)
  logits = None
  if return_logits:
    step_logits = jax.eval_shape(lambda c: call("decode_step", c, 0, span=0)[0], cache)
    logits = constrain(jnp.zeros((b, hgt * wid) + step_logits.shape[1:], jnp.float32))
  state = LoopState(cache, constrain(jnp.zeros((b, hgt * wid), jnp.int32)), logits)

  def position(span, i, j, st):
    p = jnp.asarray(i * wid + j, jnp.int32)  # lax loop indices are Python ints eagerly
    logits, cache = call("decode_step", st.cache, p, span=span)
    with jax.named_scope("choose"):
      code = choose(p, logits).astype(jnp.int32)
    cache = call("feed", cache, p, code, span=span)
    codes = lax.dynamic_update_slice_in_dim(st.codes, code[:, None], p, 1)
    if st.logits is not None:
      logits = lax.dynamic_update_slice_in_dim(st.logits, logits[:, None], p, 1)
    return LoopState(cache, codes, logits if st.logits is not None else None)

  def row(span, i, st):
    st = st.replace(cache=call("begin_row", st.cache, i))
    return lax.fori_loop(0, wid, functools.partial(position, span, i), st)

  for span, (r0, r1) in enumerate(model.decode_row_spans(shape)):
    state = lax.fori_loop(r0, r1, functools.partial(row, span), state)
  codes = state.codes.reshape(shape)
  if not return_logits:
    return codes
  return codes, state.logits.reshape(shape + state.logits.shape[2:])


_run = jax.jit(decode_loop, static_argnames=("model", "shape", "choose", "sharding",
                                             "return_logits"))


def run_incremental(prior: Any, params: Any, *, shape: tuple[int, int, int],
                    cond_codes: Sequence[jax.Array] = (), labels: jax.Array | None = None,
                    choose: Choose, sharding: jax.sharding.Sharding | None = None,
                    return_logits: bool = False):
  """Raster-order incremental pass with a pluggable per-position choice.

  At every raster position p = i * W + j (in order) the loop computes the prior's
  logits there from the codes already chosen at positions < p, calls
  `codes_p = choose(p, logits)` and feeds codes_p back exactly as a sampled code.

  Determinism (the entropy codec relies on it): one compiled loop, for fixed shapes
  (batch size included), cond_codes, labels and params, passes bit-identical logits to
  `choose` at position p in every run in which `choose` returned the same codes at all
  positions < p. So an encoder that returns the known codes and a decoder that decodes
  them see the same probabilities. Logits of another batch size, dtype or backend may
  differ in the last bits; they agree with the teacher-forced pass to float tolerance.

  Args:
    prior: the prior module (any model with the decoding interface, see the module
      docstring, e.g. PixelSNAILPrior).
    params: its 'params' collection (boxed or plain).
    shape: (B, H, W) of the codes.
    cond_codes: int32 [B, H/s, W/s] upper-level codes (top first); may be batch-sharded.
    labels: int32 [B] class labels (class-conditional priors only).
    choose: static, hashable callable (p int32 scalar, logits float32 [B, K]) -> int32 [B],
      traced inside the loop; it may use `jax.experimental.io_callback(..., ordered=True)`.
      Module-level functions or functools.partial of them with hashable arguments keep
      jit's cache warm; a new lambda per call recompiles.
    sharding: optional sharding for the batch axis (e.g. NamedSharding(mesh, P('data')))
      imposed on the canvas and the caches; by default sharding follows the inputs.
    return_logits: also return the logits passed to choose at every position.

  Returns:
    int32 [B, H, W] codes, or (codes, float32 [B, H, W, K] logits) with return_logits.
  """
  shape = draw_lib.check_inputs(prior, shape, cond_codes, labels)
  return _run(prior, draw_lib.plain_params(params), tuple(cond_codes), labels, shape=shape,
              choose=choose, sharding=sharding, return_logits=bool(return_logits))


@functools.partial(jax.jit, static_argnames=("prior", "shape", "top_k", "nucleus",
                                             "return_logits", "sharding", "guided"))
def _sample(prior, params, rng, cond_codes, labels, temperature, top_p, guidance, *, shape,
            top_k, nucleus, return_logits, sharding, guided):
  def choose(p, logits):
    return draw_lib.draw(rng, p, logits, temperature, top_k, top_p, nucleus=nucleus)
  if not guided:
    return decode_loop(prior, params, cond_codes, labels, shape=shape, choose=choose,
                 sharding=sharding, return_logits=return_logits)

  # Guidance: one loop (one cache) over the interleaved doubled batch; at each position
  # the pair logits combine into one guided row, drawn once, and the code is fed back to
  # both the conditional and the null-label row.
  def choose_guided(p, logits2):
    return jnp.repeat(choose(p, draw_lib.guided_logits(logits2, guidance)), 2, axis=0)
  shape2, cond2, labels2 = draw_lib.double_inputs(prior, shape, cond_codes, labels)
  out = decode_loop(prior, params, cond2, labels2, shape=shape2, choose=choose_guided,
              sharding=sharding, return_logits=return_logits)
  if not return_logits:
    return out[0::2]
  return out[0][0::2], draw_lib.guided_logits(out[1], guidance)


def sample_incremental(prior: Any, params: Any, rng: jax.Array, *,
                       shape: tuple[int, int, int], cond_codes: Sequence[jax.Array] = (),
                       labels: jax.Array | None = None, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0, guidance: float = 1.0,
                       return_logits: bool = False,
                       sharding: jax.sharding.Sharding | None = None):
  """Raster-order ancestral sampling: `run_incremental` with the shared draw.

  Same arguments, same per-position keys (jax.random.fold_in(rng, p)) and the same draw
  as `sample_reference`, so both give the same codes for the same rng.

  Args:
    prior: the prior module.
    params: its 'params' collection (boxed or plain).
    rng: PRNG key.
    shape: (B, H, W).
    cond_codes: int32 [B, H/s, W/s] upper-level codes (top first); may be batch-sharded.
    labels: int32 [B] class labels (class-conditional priors only).
    temperature, top_k, top_p: see `draw_lib.filter_logits`.
    guidance: classifier-free guidance scale w (1 = off, exactly plain sampling); != 1
      runs the loop on the doubled batch of `draw_lib.double_inputs` (2x the compute)
      and needs a prior with a null label.
    return_logits: also return the logits used at every position (guided ones with
      guidance).
    sharding: optional sharding for the batch axis (e.g. NamedSharding(mesh, P('data')))
      imposed on the canvas and the caches; by default sharding follows the inputs.

  Returns:
    int32 [B, H, W] codes, or (codes, float32 [B, H, W, K] logits) with return_logits.
  """
  shape = draw_lib.check_args(prior, shape, cond_codes, labels, temperature, top_k, top_p)
  guided = draw_lib.guidance_active(prior, guidance)
  return _sample(prior, draw_lib.plain_params(params), rng, tuple(cond_codes), labels,
                 jnp.float32(temperature), jnp.float32(top_p), jnp.float32(guidance),
                 shape=shape, top_k=top_k, nucleus=draw_lib.nucleus_active(top_p),
                 return_logits=bool(return_logits), sharding=sharding, guided=guided)
