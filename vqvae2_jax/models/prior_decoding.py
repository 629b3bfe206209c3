"""The decoding step of `PixelSNAILPrior`: one raster position at a time, from a cache.

What one new position costs, about one forward pass per sample in all, with the prior's
own layers (one definition each) in its one-module-per-layer layout. Work that depends
only on rows above is done once per row, for all its positions, as wide convolutions and
matmuls; only what reads the current row runs per position:

* `init_cache`: the conditioning stack (upper levels + class), once per sample;
* `begin_row(i)` (all rows < i known): the vertical stream of every gated layer on row i
  (its ConvDown reads rows <= i of the vertical stream, i.e. codes of rows < i), and for
  the horizontal stream the part of every ConvDownRight that reads the rows above, plus
  the link from the vertical stream and the class/upper-level projection: one [B, W, 2C]
  row term per layer;
* `decode_step(p)` at p = (i, j): per layer, the row term at j plus the ConvDownRight
  taps on the current row only (kh of its kh x kh taps; a [B, kh*C] x [kh*C, 2C]
  matmul), the gate, attention of the new query over a fixed-size key/value cache
  (masked, no growing shapes), the output stack and head -> logits [B, K];
* `feed(p, code)`: the chosen code's embedding enters the row buffers and the attention
  caches (keys/values at p include the embedded code at p).

Caches are rolling buffers of the last few rows ([B, rows, W + pad, C] per layer), so
memory is O(B * W * C * layers), not O(B * H * W * C * layers). Attention caches are kept
in the layout the score contraction reads ([B, heads, n, d]) as one chunk per row span
(`row_spans`): a query in span s reads the chunks of spans <= s only, about (S + 1) / 2S
of the cache, and span s is a static argument of the step (one compiled copy each).

The functions take the bound prior `m` (they run inside `PixelSNAILPrior`'s methods of
the same names, through `prior.apply(..., method=...)`). These are the functions of a
`scan_layers=False` prior; `models/prior_decoding_scanned.py` does the same work for a
scanned one, on its stacked parameters.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from vqvae2_jax.models import causal
from vqvae2_jax.models.prior_blocks import attention_inputs

# Row spans of the attention cache, at least 4 rows each; each adds one copy of the row
# loop to a sampler's compiled program. 4 reads 5/8 of a full cache per query.
ATTENTION_SPANS = 4
# Named scopes of the decoding work (benchmarks/profile_sampling.py groups by them).
PROFILE_SCOPES = ("row_terms", "horizontal_taps", "attend_cached", "cache_update")


@struct.dataclass
class DecodeCache:
  """What the decoding step keeps between positions ([B, ...] unless said otherwise).

  Attributes:
    cond: conditioning features [B, H, W, C], or None (unconditional prior).
    positions: the attention blocks' positional features [H * W, P] (no batch axis),
      computed once rather than in every step; None without attention.
    row_kernels: per gated layer, its ConvDownRight taps on the rows above
      [kh-1, kh, C, 2C] (no batch axis).
    tap_kernels: per gated layer, its taps on the current row as a matmul [kh*C, 2C]
      (no batch axis).
    xv: the last kx rows of embedded codes, width-padded for in_v [kx, W + k - 1, C].
    vin, hin: per gated layer, the last kh-1 rows of the elu'd inputs of its ConvDown
      [kh-1, W + k - 1, C] and ConvDownRight [kh-1, W + kh - 1, C], padded as they pad.
    v0: the current row's initial streams (before in_h's term) [W, C].
    terms: per gated layer, the current row's horizontal term [W, 2C].
    xrow: embedded codes of the current row, left-padded for in_h [W + kx - 1, C].
    hrow: per gated layer, elu'd inputs of its ConvDownRight on the current row,
      left-padded [W + kh - 1, C].
    attn_in: per attention block, h at the current position before it [C] (its keys and
      values are computed once the code there is known).
    keys, values: per attention block, one chunk [B, heads, span rows * W, d] per row span.
    shape: (B, H, W) of the code map (static).

  A scanned prior's cache (models/prior_decoding_scanned.py) holds each per-layer field
  as one pair (segments' layers [S, E, ...], tail [R, ...]) of stacked arrays, attn_in as
  [S, B, C] and every key/value chunk as [S, B, heads, n, d].
  """
  cond: Any
  positions: Any
  row_kernels: tuple
  tap_kernels: tuple
  xv: jax.Array
  vin: tuple
  hin: tuple
  v0: jax.Array
  terms: tuple
  xrow: jax.Array
  hrow: tuple
  attn_in: tuple
  keys: tuple
  values: tuple
  shape: tuple[int, int, int] = struct.field(pytree_node=False)


def row_spans(height: int, attention: bool) -> tuple[tuple[int, int], ...]:
  """Static row spans [(first row, end row)] of the attention cache's chunks."""
  n = max(1, min(ATTENTION_SPANS, height // 4)) if attention else 1
  bounds = [round(s * height / n) for s in range(n + 1)]
  return tuple(zip(bounds[:-1], bounds[1:]))


def _roll_in(buf: jax.Array, row: jax.Array) -> jax.Array:
  """Drops the oldest row of buf [..., B, R, Wp, C] and appends row [..., B, Wp, C]
  (leading axes: a scanned prior's stacked layers)."""
  return jnp.concatenate([buf[..., 1:, :, :], row[..., None, :, :].astype(buf.dtype)], -3)


def _pad_cols(row: jax.Array, left: int, right: int) -> jax.Array:
  """Zero-pads the width axis of row [B, W, C] to [B, left + W + right, C]."""
  return jnp.pad(row, ((0, 0), (left, right), (0, 0)))


def _conv_row(window: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID conv of a pre-padded window [B, kr, W + kw - 1, C] with kernel [kr, kw, C, O]
  -> one output row [B, W, O]."""
  y = lax.conv_general_dilated(window.astype(kernel.dtype), kernel, (1, 1), "VALID",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y[:, 0]


def init_cache(m, shape: tuple[int, int, int], cond_codes, labels, sharding) -> DecodeCache:
  """The empty cache of a [B, H, W] code map (conditioning computed here, once)."""
  b, hgt, wid = shape
  k, ch, dt = m.kernel_size, m.hidden, m.dtype
  kh, kx = k // 2 + 1, k // 2
  heads = m.num_heads

  def zeros(*dims):
    x = jnp.zeros((b,) + dims, dt)
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)

  weights = [layer.h_conv.weights()[0] for layer in m.layers]
  spans = row_spans(hgt, bool(m.attn))
  chunks = lambda: tuple(zeros(heads, (r1 - r0) * wid, ch // heads) for r0, r1 in spans)
  return DecodeCache(
      cond=m.conditioning(cond_codes, labels, shape, train=False),
      positions=causal.positional_features(hgt, wid) if m.attn else None,
      row_kernels=tuple(w[:kh - 1] for w in weights),
      tap_kernels=tuple(w[kh - 1].reshape(kh * ch, 2 * ch) for w in weights),
      xv=zeros(kx, wid + 2 * kx, ch),
      vin=tuple(zeros(kh - 1, wid + 2 * kx, ch) for _ in m.layers),
      hin=tuple(zeros(kh - 1, wid + kh - 1, ch) for _ in m.layers),
      v0=zeros(wid, ch),
      terms=tuple(zeros(wid, 2 * ch) for _ in m.layers),
      xrow=zeros(wid + kx - 1, ch),
      hrow=tuple(zeros(wid + kh - 1, ch) for _ in m.layers),
      attn_in=tuple(zeros(ch) for _ in m.attn),
      keys=tuple(chunks() for _ in m.attn),
      values=tuple(chunks() for _ in m.attn),
      shape=(b, hgt, wid))


def begin_row(m, cache: DecodeCache, row: jax.Array) -> DecodeCache:
  """Moves the finished row into the rolling caches and computes everything of `row`
  that reads only rows above: v0 and every gated layer's vertical stream and
  horizontal row term."""
  with jax.named_scope("row_terms"):
    k, dt = m.kernel_size, m.dtype
    kx, pad = k // 2, k // 2  # in_v (kx, k) 'down'; ConvDown pads k // 2 each side
    xv = _roll_in(cache.xv, _pad_cols(cache.xrow[:, kx - 1:], pad, pad))
    hin = tuple(_roll_in(c, r) for c, r in zip(cache.hin, cache.hrow))
    v0 = m.in_v(xv, True)[:, 0]  # in_v output at row i-1 = down-shifted row i
    v0 = jnp.where(row > 0, v0, 0)  # down shift: row 0 sees no row above, not in_v's bias
    c_row = (None if cache.cond is None
             else lax.dynamic_index_in_dim(cache.cond, row, 1, keepdims=False))
    v, terms, vin = v0, [], []
    for l, layer in enumerate(m.layers):
      window = jnp.concatenate(
          [cache.vin[l], _pad_cols(nn.elu(v), pad, pad)[:, None].astype(dt)], axis=1)
      vin.append(window[:, 1:])
      c1 = None if c_row is None else c_row[:, None]
      v = layer.vertical(v[:, None], window, c1, prepadded=True, train=False)[:, 0]
      term = (_conv_row(hin[l], cache.row_kernels[l]) + layer.h_conv.weights()[1]
              + layer.link(nn.elu(v)))
      if layer.conditioned:
        term = term + layer.cond_h(c_row)
      terms.append(term)
    return cache.replace(xv=xv, hin=hin, vin=tuple(vin), v0=v0, terms=tuple(terms))


def _span_start(cache: DecodeCache, span: int) -> int:
  """Raster position of the first entry of span `span`'s attention chunk."""
  _, hgt, wid = cache.shape
  return row_spans(hgt, bool(cache.keys))[span][0] * wid


def _position_features(cache: DecodeCache, p: jax.Array) -> jax.Array:
  """The attention blocks' positional features at raster position p, [B, P] (None
  without attention)."""
  pos = cache.positions
  if pos is None:
    return None
  return jnp.broadcast_to(pos[p], (cache.shape[0], pos.shape[-1]))


def step_inputs(m, cache: DecodeCache, p: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
  """What both layouts' decode_step start from at raster position p: (p as int32, its
  column j, the positional features at p [B, F] (None without attention), the first
  layer's horizontal-stream input h [B, C])."""
  kx = m.kernel_size // 2
  p = jnp.asarray(p, jnp.int32)
  j = p % cache.shape[2]
  pos_p = _position_features(cache, p)
  # in_h at (i, j-1) reads x(i, j-kx .. j-1) = xrow padded columns j-1 .. j+kx-2.
  hx = m.in_h(lax.dynamic_slice_in_dim(cache.xrow, jnp.maximum(j - 1, 0), kx, 1)[:, None],
              True)
  h = lax.dynamic_index_in_dim(cache.v0, j, 1, keepdims=False) + jnp.where(j > 0, hx, 0)
  return p, j, pos_p, h


def decode_step(m, cache: DecodeCache, p: jax.Array, span: int
                ) -> tuple[jax.Array, DecodeCache]:
  """float32 logits [B, K] at raster position p (codes < p fed), and the cache holding
  this position's horizontal-stream inputs."""
  k, ch, dt = m.kernel_size, m.hidden, m.dtype
  kh = k // 2 + 1
  b, _, wid = cache.shape
  p, j, pos_p, h = step_inputs(m, cache, p)
  hrow, attn_in = list(cache.hrow), []
  start = _span_start(cache, span)
  a = 0
  for l in range(len(m.layers)):
    hrow[l] = lax.dynamic_update_slice_in_dim(hrow[l], nn.elu(h)[:, None].astype(dt),
                                              j + kh - 1, 1)
    with jax.named_scope("horizontal_taps"):
      taps = lax.dynamic_slice_in_dim(hrow[l], j, kh, 1).reshape(b, kh * ch)
      act = (lax.dynamic_index_in_dim(cache.terms[l], j, 1, keepdims=False)
             + taps @ cache.tap_kernels[l])
      h = h + causal.gate(act)
    if l in m.attn_after:
      q_in, _ = attention_inputs(h, h, pos_p)
      q = m.attn[a].queries(q_in)  # [B, heads, d]
      attn_in.append(h)
      with jax.named_scope("attend_cached"):
        h = h + m.attn[a].attend_cached(q, cache.keys[a][:span + 1],
                                        cache.values[a][:span + 1], p, start)
      a += 1
  logits = m.output(h, train=False).astype(jnp.float32)  # [B, K]
  return logits, cache.replace(hrow=tuple(hrow), attn_in=tuple(attn_in))


def feed(m, cache: DecodeCache, p: jax.Array, code: jax.Array, span: int) -> DecodeCache:
  """The code int32 [B] chosen at raster position p enters the current row's buffer and
  the attention caches."""
  kx, dt = m.kernel_size // 2, m.dtype
  p = jnp.asarray(p, jnp.int32)
  j = p % cache.shape[2]
  pos_p = _position_features(cache, p)
  x_p = m.embed(code)
  xrow = lax.dynamic_update_slice_in_dim(cache.xrow, x_p[:, None].astype(dt), j + kx - 1, 1)
  start = _span_start(cache, span)
  keys, values = list(cache.keys), list(cache.values)
  for a, h_a in enumerate(cache.attn_in):
    _, kv_in = attention_inputs(h_a, x_p, pos_p)
    key, val = m.attn[a].keys_values(kv_in)  # [B, heads, d]
    with jax.named_scope("cache_update"):
      keys[a] = _write(keys[a], span, key[:, :, None].astype(dt), p - start)
      values[a] = _write(values[a], span, val[:, :, None].astype(dt), p - start)
  return cache.replace(xrow=xrow, keys=tuple(keys), values=tuple(values))


def _write(chunks: tuple, span: int, entry: jax.Array, index: jax.Array) -> tuple:
  """chunks with entry [B, heads, 1, d] written into chunk `span` at `index`."""
  new = lax.dynamic_update_slice_in_dim(chunks[span], entry, index, 2)
  return chunks[:span] + (new,) + chunks[span + 1:]
