"""Incremental (cached) ancestral sampler for `PixelSNAILPrior`, about one forward pass.

Computes only what each new position needs, with the prior's own submodules (called
through `prior.apply(..., method=...)`, so every layer has one definition), in the
prior's one-module-per-layer layout (`models.prior.decoding_view`: a scanned prior's
stacked parameters are sliced per layer once, outside the loop). Work that
depends only on rows above is done once per row, for all its positions, as wide
convolutions and matmuls; only what reads the current row runs per position:

* the conditioning stack (upper levels + class) runs once per sample;
* at the start of row i (all rows < i known): the vertical stream of every gated layer
  on row i (its ConvDown reads rows <= i of the vertical stream, i.e. codes of rows < i),
  and for the horizontal stream the part of every ConvDownRight that reads the rows
  above, plus the link from the vertical stream and the class/upper-level projection:
  one [B, W, 2C] row term per layer;
* at position (i, j): per layer, the row term at j plus the ConvDownRight taps on the
  current row only (kh of its kh x kh taps; a [B, kh*C] x [kh*C, 2C] matmul), the gate,
  attention of the new query over a fixed-size key/value cache (masked, no growing
  shapes), the output stack and head -> logits [B, K];
* after the code at (i, j) is chosen: its embedding enters the row buffers and the
  attention caches (keys/values at p include the embedded code at p).

Caches are rolling buffers of the last few rows ([B, rows, W + pad, C] per layer), so
memory is O(B * W * C * layers), not O(B * H * W * C * layers). Attention caches are kept
in the layout the score contraction reads ([B, heads, n, d]), so no step transposes them,
as one chunk per segment of rows: a query in segment s reads the chunks of segments <= s.

Per-position choice is pluggable (`run_incremental(..., choose=...)`): sampling plugs in
the temperature / top-k / top-p draw; the entropy codec plugs in an ordered io_callback.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqvae2_jax.models import causal
from vqvae2_jax.models.prior import PixelSNAILPrior, attention_positions, decoding_view
from vqvae2_jax.sampling import draw as draw_lib

Choose = Callable[[jax.Array, jax.Array], jax.Array]
# Row segments of the attention cache (see _loop), at least 4 rows each; each adds one
# copy of the row loop to the compiled program. 4 reads 5/8 of a full cache per query.
ATTENTION_SEGMENTS = 4
_MASKED = -1e9  # masked attention score: exp underflows to exactly 0 (as in causal.py)
# Named scopes of the loop's own work (benchmarks/profile_sampling.py groups by them).
PROFILE_SCOPES = ("row_terms", "horizontal_taps", "attend_cached", "choose", "cache_update")


def _roll_in(buf: jax.Array, row: jax.Array) -> jax.Array:
  """Drops the oldest row of buf [B, R, Wp, C] and appends row [B, Wp, C]."""
  return jnp.concatenate([buf[:, 1:], row[:, None].astype(buf.dtype)], axis=1)


def _pad_cols(row: jax.Array, left: int, right: int) -> jax.Array:
  """Zero-pads the width axis of row [B, W, C] to [B, left + W + right, C]."""
  return jnp.pad(row, ((0, 0), (left, right), (0, 0)))


def _conv_row(window: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID conv of a pre-padded window [B, kr, W + kw - 1, C] with kernel [kr, kw, C, O]
  -> one output row [B, W, O]."""
  y = lax.conv_general_dilated(window.astype(kernel.dtype), kernel, (1, 1), "VALID",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y[:, 0]


def _attend_cached(attn: causal.CausalSelfAttention, q: jax.Array,
                   keys: Sequence[jax.Array], values: Sequence[jax.Array], p: jax.Array,
                   start) -> jax.Array:
  """One strictly causal attention query per batch row over a chunked key/value cache.

  The math of `causal.CausalSelfAttention.attend` (float32 scores / sqrt(d), masked
  softmax, zero weights at position 0, then the output projection), reading the cache in
  place: chunks [B, heads, n_c, d] of consecutive positions, all visible but the last,
  which begins at raster position `start` and is masked to positions < p.

  Args:
    attn: the bound attention module. q: [B, heads, d] query at position p (int32).

  Returns:
    float [B, features].
  """
  with jax.named_scope("attend_cached"):
    return _attend_cached_impl(attn, q, keys, values, p, start)


def _attend_cached_impl(attn, q, keys, values, p, start):
  d = q.shape[-1]
  qf = q.astype(jnp.float32)
  scores = [jnp.einsum("bhd,bhnd->bhn", qf, kc.astype(jnp.float32)) / math.sqrt(d)
            for kc in keys]
  visible = start + jnp.arange(keys[-1].shape[2]) < p
  scores[-1] = jnp.where(visible, scores[-1], _MASKED)
  weights = jax.nn.softmax(jnp.concatenate(scores, -1), axis=-1) * (p > 0)
  splits = np.cumsum([kc.shape[2] for kc in keys[:-1]]).tolist()
  out = sum(jnp.einsum("bhn,bhnd->bhd", w.astype(attn.dtype), vc.astype(attn.dtype))
            for w, vc in zip(jnp.split(weights, splits, axis=-1), values))
  return attn.out(out.reshape(out.shape[0], -1))


def _loop(prior: PixelSNAILPrior, params, cond_codes, labels, *, shape, choose, sharding,
          return_logits):
  """The traced sampling loop (call inside jit). Returns codes [, logits]."""
  prior, params = decoding_view(prior, params)  # per-layer slices of stacked params
  b, hgt, wid = shape
  k, ch, dt, n_codes = prior.kernel_size, prior.hidden, prior.dtype, prior.num_codes
  kh = k // 2 + 1  # gated convs: ConvDown (kh, k), ConvDownRight (kh, kh)
  kx = k // 2  # input convs: in_v (kx, k) 'down' + down shift, in_h (1, kx) + right shift
  attn_after = attention_positions(prior.num_layers, prior.attention_every)
  n_layers, heads = prior.num_layers, prior.num_heads
  variables = {"params": params}

  def apply(fn, *args):
    return prior.apply(variables, *args, method=fn)

  def constrain(x):
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)

  def zeros(*dims, dtype=dt):
    return constrain(jnp.zeros((b,) + dims, dtype))

  cond = apply(lambda m, cc, lab: m.conditioning(cc, lab, shape, train=False),
               cond_codes, labels)
  pos = causal.positional_features(hgt, wid)

  def h_kernels(m):
    """Per gated layer, its ConvDownRight kernel split into the rows-above part
    [kh-1, kh, C, 2C] and the current-row taps as a matmul [kh*C, 2C]."""
    out = []
    for layer in m.layers:
      kern = nn.meta.unbox(layer.h_conv.variables["params"]["kernel"]).astype(dt)
      out.append((kern[:kh - 1], kern[kh - 1].reshape(kh * ch, 2 * ch)))
    return out

  kernels = apply(h_kernels)
  # Row segments: while sampling segment s, queries attend to the chunks of segments <= s
  # only, about (G + 1) / 2G of the fixed-size cache instead of all of it.
  n_seg = max(1, min(ATTENTION_SEGMENTS, hgt // 4)) if attn_after else 1
  bounds = [round(s * hgt / n_seg) for s in range(n_seg + 1)]
  segments = list(zip(bounds[:-1], bounds[1:]))
  vpad = k // 2  # ConvDown's left/right padding
  state = dict(
      codes=constrain(jnp.zeros(shape, jnp.int32)),
      # Rolling caches of the rows above: embedded codes for in_v (last kx rows), and per
      # gated layer the elu'd inputs of its ConvDown (last kh-1 rows) and ConvDownRight
      # (last kh-1 rows), each zero-padded on the width axis as its conv pads.
      xv=zeros(kx, wid + 2 * vpad, ch),
      vin=[zeros(kh - 1, wid + 2 * vpad, ch) for _ in range(n_layers)],
      hin=[zeros(kh - 1, wid + kh - 1, ch) for _ in range(n_layers)],
      # Attention caches per layer as one chunk [B, heads, rows * W, d] per row segment.
      keys=[[zeros(heads, (r1 - r0) * wid, ch // heads) for r0, r1 in segments]
            for _ in attn_after],
      values=[[zeros(heads, (r1 - r0) * wid, ch // heads) for r0, r1 in segments]
              for _ in attn_after],
  )
  if return_logits:
    state["logits"] = constrain(jnp.zeros(shape + (n_codes,), jnp.float32))

  def row_terms(m, i, st):
    """Everything of row i that reads only rows < i.

    Returns v0 [B, W, C] (initial vertical stream = initial horizontal stream before
    the right-shifted in_h term), per layer the horizontal row term [B, W, 2C], and
    the updated vin caches.
    """
    v0 = m.in_v(st["xv"], True)[:, 0]  # in_v output at row i-1 = down-shifted row i
    v0 = jnp.where(i > 0, v0, 0)  # down shift: row 0 sees no row above, not in_v's bias
    c_row = None if cond is None else lax.dynamic_index_in_dim(cond, i, 1, keepdims=False)
    v, terms, vin = v0, [], []
    for l, layer in enumerate(m.layers):
      window = jnp.concatenate(
          [st["vin"][l], _pad_cols(nn.elu(v), vpad, vpad)[:, None].astype(dt)], axis=1)
      vin.append(window[:, 1:])
      c1 = None if c_row is None else c_row[:, None]
      v = layer.vertical(v[:, None], window, c1, prepadded=True, train=False)[:, 0]
      term = (_conv_row(st["hin"][l], kernels[l][0])
              + nn.meta.unbox(layer.h_conv.variables["params"]["bias"]).astype(dt)
              + layer.link(nn.elu(v)))
      if layer.conditioned:
        term = term + layer.cond_h(c_row)
      terms.append(term)
    return v0, terms, vin

  def position(m, i, j, v0, terms, done, start, st):
    """Logits at (i, j), the chosen code, and every row buffer / cache that reads it.

    done: per attention layer the (keys, values) chunks of finished segments; st holds
    the current segment's chunks, which begin at raster position `start`."""
    p = (i * wid + j).astype(jnp.int32)
    st = dict(st, hrow=list(st["hrow"]), keys=list(st["keys"]), values=list(st["values"]))
    # in_h at (i, j-1) reads x(i, j-kx .. j-1) = xrow padded columns j-1 .. j+kx-2.
    hx = m.in_h(lax.dynamic_slice_in_dim(st["xrow"], jnp.maximum(j - 1, 0), kx, 1)[:, None],
                True)
    h = lax.dynamic_index_in_dim(v0, j, 1, keepdims=False) + jnp.where(j > 0, hx, 0)
    pos_p = jnp.broadcast_to(pos[p], (b, pos.shape[-1]))
    attn_in, a = [], 0
    for l, layer in enumerate(m.layers):
      st["hrow"][l] = lax.dynamic_update_slice_in_dim(
          st["hrow"][l], nn.elu(h)[:, None].astype(dt), j + kh - 1, 1)
      with jax.named_scope("horizontal_taps"):
        taps = lax.dynamic_slice_in_dim(st["hrow"][l], j, kh, 1).reshape(b, kh * ch)
        act = lax.dynamic_index_in_dim(terms[l], j, 1, keepdims=False) + taps @ kernels[l][1]
        h = h + causal.gate(act)
      if l in attn_after:
        q_in, _ = m.attention_inputs(h, h, pos_p)
        q = m.attn[a].queries(q_in)  # [B, heads, d]
        attn_in.append(h)
        h = h + _attend_cached(m.attn[a], q, done[a][0] + [st["keys"][a]],
                               done[a][1] + [st["values"][a]], p, start)
        a += 1
    logits = m.output(h, train=False).astype(jnp.float32)  # [B, K]
    with jax.named_scope("choose"):
      code = choose(p, logits).astype(jnp.int32)
    x_p = m.embed(code)
    st["xrow"] = lax.dynamic_update_slice_in_dim(st["xrow"], x_p[:, None].astype(dt),
                                                 j + kx - 1, 1)
    for a, h_a in enumerate(attn_in):
      _, kv_in = m.attention_inputs(h_a, x_p, pos_p)
      key, val = m.attn[a].keys_values(kv_in)  # [B, heads, d]
      with jax.named_scope("cache_update"):
        st["keys"][a] = lax.dynamic_update_slice_in_dim(
            st["keys"][a], key[:, :, None].astype(dt), p - start, 2)
        st["values"][a] = lax.dynamic_update_slice_in_dim(
            st["values"][a], val[:, :, None].astype(dt), p - start, 2)
    st["codes"] = lax.dynamic_update_slice_in_dim(st["codes"], code[:, None], j, 1)
    if return_logits:
      st["logits"] = lax.dynamic_update_slice_in_dim(st["logits"], logits[:, None], j, 1)
    return st

  def row_body(seg, i, st):
    with jax.named_scope("row_terms"):
      v0, terms, vin = apply(row_terms, i, st)
    done = [(kk[:seg], vv[:seg]) for kk, vv in zip(st["keys"], st["values"])]
    start = segments[seg][0] * wid
    inner = dict(xrow=zeros(wid + kx - 1, ch), hrow=[zeros(wid + kh - 1, ch)] * n_layers,
                 keys=[kk[seg] for kk in st["keys"]], values=[vv[seg] for vv in st["values"]],
                 codes=zeros(wid, dtype=jnp.int32))
    if return_logits:
      inner["logits"] = zeros(wid, n_codes, dtype=jnp.float32)
    inner = lax.fori_loop(
        0, wid, lambda j, s: apply(position, i, j, v0, terms, done, start, s), inner)
    x_row = apply(lambda m, c: m.embed(c), inner["codes"])  # [B, W, C]
    replace = lambda chunks, new: chunks[:seg] + [new] + chunks[seg + 1:]
    out = dict(st, vin=vin,
               keys=[replace(kk, nk) for kk, nk in zip(st["keys"], inner["keys"])],
               values=[replace(vv, nv) for vv, nv in zip(st["values"], inner["values"])],
               xv=_roll_in(st["xv"], _pad_cols(x_row, vpad, vpad)),
               hin=[_roll_in(c, r) for c, r in zip(st["hin"], inner["hrow"])],
               codes=lax.dynamic_update_slice_in_dim(st["codes"], inner["codes"][:, None],
                                                     i, 1))
    if return_logits:
      out["logits"] = lax.dynamic_update_slice_in_dim(st["logits"], inner["logits"][:, None],
                                                      i, 1)
    return out

  for seg, (r0, r1) in enumerate(segments):
    state = lax.fori_loop(r0, r1, functools.partial(row_body, seg), state)
  return (state["codes"], state["logits"]) if return_logits else state["codes"]


_run = jax.jit(_loop, static_argnames=("prior", "shape", "choose", "sharding",
                                       "return_logits"))


def run_incremental(prior: PixelSNAILPrior, params: Any, *, shape: tuple[int, int, int],
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
    prior: the prior module.
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
    return _loop(prior, params, cond_codes, labels, shape=shape, choose=choose,
                 sharding=sharding, return_logits=return_logits)

  # Guidance: one loop (one cache) over the interleaved doubled batch; at each position
  # the pair logits combine into one guided row, drawn once, and the code is fed back to
  # both the conditional and the null-label row.
  def choose_guided(p, logits2):
    return jnp.repeat(choose(p, draw_lib.guided_logits(logits2, guidance)), 2, axis=0)
  shape2, cond2, labels2 = draw_lib.double_inputs(prior, shape, cond_codes, labels)
  out = _loop(prior, params, cond2, labels2, shape=shape2, choose=choose_guided,
              sharding=sharding, return_logits=return_logits)
  if not return_logits:
    return out[0::2]
  return out[0][0::2], draw_lib.guided_logits(out[1], guidance)


def sample_incremental(prior: PixelSNAILPrior, params: Any, rng: jax.Array, *,
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
