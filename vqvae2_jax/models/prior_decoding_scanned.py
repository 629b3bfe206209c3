"""The decoding step of a `scan_layers=True` PixelSNAILPrior: its layers scanned, not
unrolled.

The same computation as `models/prior_decoding.py` (read it first: the cache, the row
and position work), on the scanned prior's stacked parameters as they are
(`models/prior_blocks.py` GatedStack: segments/layers/* [S, E, ...], segments/attn/*
[S, ...], tail/* [R, ...]). Every per-layer part of the cache is stacked the same way,
as a pair of groups (segments [S, E, B, ...], tail [R, B, ...]; None where the stack has
no such layers), and per-attention-block parts as [S, B, ...]. begin_row, decode_step
and feed go through the layers as `lax.scan`s over those leading axes, each layer
applied as a fresh `GatedLayer` / `CausalSelfAttention` on its slice of the parameters:
one scan over segments (an inner scan over their E gated layers, then the attention
block) and one over the tail, as the training stack does. So the compiled sampling loop
holds one copy of a gated layer per kind of segment, whatever the depth (a paper-size
prior's 20 unrolled layers took TPU compiles of tens of minutes).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from vqvae2_jax.models import causal
from vqvae2_jax.models.prior_blocks import GatedLayer, attention_inputs
from vqvae2_jax.models.prior_decoding import (DecodeCache, _conv_row, _pad_cols, _roll_in,
                                              _position_features, _span_start, row_spans,
                                              step_inputs)

Groups = tuple[Any, Any]  # (segments [S, E, ...], tail [R, ...]); None where absent


def _stack_params(m) -> tuple[Groups, Any]:
  """((segment layers' params [S, E, ...], tail params [R, ...]), attention params
  [S, ...]) of the bound prior m; None for what its stack lacks."""
  stack = nn.meta.unbox(m.variables["params"]["stack"])
  segments = stack.get("segments")
  layers = (None if segments is None else segments["layers"], stack.get("tail"))
  return layers, None if segments is None else segments["attn"]


def _lead(group: Any) -> tuple[int, ...]:
  """Leading layer axes of a group's params: (S, E) or (R,)."""
  return group["h_conv"]["kernel"].shape[:-4]


def _map(fn: Callable, *groups: Groups) -> Groups:
  """fn applied to each present group (all present or absent alike)."""
  return tuple(None if g[0] is None else fn(*g) for g in zip(*groups))


# The layer modules are unbound (parent=None), applied to a slice of the stacked params.

def _gated_layer(m, conditioned: bool) -> GatedLayer:
  return GatedLayer(m.hidden, m.kernel_size, m.dropout, conditioned, m.dtype, parent=None)


def _attention(m) -> causal.CausalSelfAttention:
  return causal.CausalSelfAttention(m.hidden, m.num_heads, m.attn_dropout, m.dtype,
                                    parent=None)


def _per_layer(fn: Callable, params: Any, depth: int) -> Any:
  """fn(params of one layer) over `depth` leading layer axes (nested vmap)."""
  for _ in range(depth):
    fn = jax.vmap(fn)
  return fn(params)


def _through_layers(step: Callable, carry: Any, xs: Groups, *,
                    after_segment: Callable | None = None, segment_xs: Any = None):
  """Runs step(carry, x) -> (carry, y) over every gated layer in order, as scans: one
  over segments (inner scan over E layers, then after_segment(carry, segment x) ->
  (carry, y), if given) and one over the tail.

  Returns (carry, (segment ys [S, E, ...], tail ys [R, ...]), after_segment ys [S, ...]).
  """
  seg_xs, tail_xs = xs
  seg_ys = tail_ys = after_ys = None
  if seg_xs is not None:
    def segment(c, x):
      layer_xs, own_xs = x
      c, ys = lax.scan(step, c, layer_xs)
      extra = None
      if after_segment is not None:
        c, extra = after_segment(c, own_xs)
      return c, (ys, extra)
    carry, (seg_ys, after_ys) = lax.scan(segment, carry, (seg_xs, segment_xs))
  if tail_xs is not None:
    carry, tail_ys = lax.scan(step, carry, tail_xs)
  return carry, (seg_ys, tail_ys), after_ys


def _stacked_sharding(sharding, depth: int):
  """The batch sharding of [B, ...] for an array [<depth layer axes>, B, ...]."""
  if sharding is None or depth == 0:
    return sharding
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(*((None,) * depth), *sharding.spec))
  return None  # another kind of sharding: left to propagation


def init_cache(m, shape: tuple[int, int, int], cond_codes, labels, sharding) -> DecodeCache:
  """The empty cache of a [B, H, W] code map (conditioning computed here, once)."""
  b, hgt, wid = shape
  k, ch, dt = m.kernel_size, m.hidden, m.dtype
  kh, kx = k // 2 + 1, k // 2
  layers, attn = _stack_params(m)
  cond = m.conditioning(cond_codes, labels, shape, train=False)
  gated = _gated_layer(m, cond is not None)

  def zeros(lead, *dims):
    x = jnp.zeros(lead + (b,) + dims, dt)
    s = _stacked_sharding(sharding, len(lead))
    return x if s is None else lax.with_sharding_constraint(x, s)

  def kernels(group):  # ConvDownRight kernels [*lead, kh, kh, C, 2C]
    kernel = lambda p: gated.apply({"params": p}, method=lambda l: l.h_conv.weights()[0])
    return _per_layer(kernel, group, len(_lead(group)))

  leads = _map(_lead, layers)
  weights = _map(kernels, layers)
  spans = row_spans(hgt, attn is not None)
  segments = () if attn is None else (jax.tree.leaves(attn)[0].shape[0],)
  chunks = lambda: tuple(zeros(segments, m.num_heads, (r1 - r0) * wid, ch // m.num_heads)
                         for r0, r1 in spans)
  return DecodeCache(
      cond=cond,
      positions=causal.positional_features(hgt, wid) if attn is not None else None,
      row_kernels=_map(lambda w: w[..., :kh - 1, :, :, :], weights),
      tap_kernels=_map(lambda w: w[..., kh - 1, :, :, :].reshape(
          w.shape[:-4] + (kh * ch, 2 * ch)), weights),
      xv=zeros((), kx, wid + 2 * kx, ch),
      vin=_map(lambda lead: zeros(lead, kh - 1, wid + 2 * kx, ch), leads),
      hin=_map(lambda lead: zeros(lead, kh - 1, wid + kh - 1, ch), leads),
      v0=zeros((), wid, ch),
      terms=_map(lambda lead: zeros(lead, wid, 2 * ch), leads),
      xrow=zeros((), wid + kx - 1, ch),
      hrow=_map(lambda lead: zeros(lead, wid + kh - 1, ch), leads),
      attn_in=() if attn is None else zeros(segments, ch),
      keys=() if attn is None else chunks(),
      values=() if attn is None else chunks(),
      shape=(b, hgt, wid))


def _row_layer(layer: GatedLayer, v, window, hin, row_kernel, c_row):
  """One gated layer's row work (as prior_decoding.begin_row's loop body): v [B, W, C],
  its ConvDown window [B, kh, W + k - 1, C], its ConvDownRight rows above hin
  [B, kh-1, W + kh - 1, C] and their taps row_kernel -> (new v, horizontal term [B, W, 2C])."""
  c1 = None if c_row is None else c_row[:, None]
  v = layer.vertical(v[:, None], window, c1, prepadded=True, train=False)[:, 0]
  term = _conv_row(hin, row_kernel) + layer.h_conv.weights()[1] + layer.link(nn.elu(v))
  if layer.conditioned:
    term = term + layer.cond_h(c_row)
  return v, term


def begin_row(m, cache: DecodeCache, row: jax.Array) -> DecodeCache:
  """prior_decoding.begin_row over the stacked layers."""
  with jax.named_scope("row_terms"):
    k, dt = m.kernel_size, m.dtype
    kx, pad = k // 2, k // 2
    xv = _roll_in(cache.xv, _pad_cols(cache.xrow[:, kx - 1:], pad, pad))
    hin = _map(_roll_in, cache.hin, cache.hrow)
    v0 = m.in_v(xv, True)[:, 0]
    v0 = jnp.where(row > 0, v0, 0)
    c_row = (None if cache.cond is None
             else lax.dynamic_index_in_dim(cache.cond, row, 1, keepdims=False))
    layers, _ = _stack_params(m)
    gated = _gated_layer(m, cache.cond is not None)

    def step(v, x):
      params, vin_l, hin_l, kernel_l = x
      window = jnp.concatenate([vin_l, _pad_cols(nn.elu(v), pad, pad)[:, None].astype(dt)],
                               axis=1)
      v, term = gated.apply({"params": params}, v, window, hin_l, kernel_l, c_row,
                            method=_row_layer)
      return v, (window[:, 1:], term)

    xs = _map(lambda *x: x, layers, cache.vin, hin, cache.row_kernels)
    _, ys, _ = _through_layers(step, v0, xs)
    vin = _map(lambda y: y[0], ys)
    terms = _map(lambda y: y[1], ys)
    return cache.replace(xv=xv, hin=hin, vin=vin, v0=v0, terms=terms)


def _attend(attn: causal.CausalSelfAttention, q_in, keys, values, p, start):
  return attn.attend_cached(attn.queries(q_in), keys, values, p, start)


def decode_step(m, cache: DecodeCache, p: jax.Array, span: int
                ) -> tuple[jax.Array, DecodeCache]:
  """prior_decoding.decode_step over the stacked layers."""
  k, ch, dt = m.kernel_size, m.hidden, m.dtype
  kh = k // 2 + 1
  b, _, wid = cache.shape
  p, j, pos_p, h = step_inputs(m, cache, p)
  start = _span_start(cache, span)
  _, attn = _stack_params(m)
  attention = _attention(m)
  # This column's row terms [..., B, 2C] and the kh-1 earlier inputs of each layer's
  # ConvDownRight on this row [..., B, kh-1, C]; the layer's own input joins them below.
  terms_j = _map(lambda t: lax.dynamic_index_in_dim(t, j, t.ndim - 2, keepdims=False),
                 cache.terms)
  earlier = _map(lambda r: lax.dynamic_slice_in_dim(r, j, kh - 1, r.ndim - 2), cache.hrow)

  def step(h, x):
    term_l, earlier_l, tap_kernel_l = x
    h_in = nn.elu(h).astype(dt)
    with jax.named_scope("horizontal_taps"):
      taps = jnp.concatenate([earlier_l, h_in[:, None]], axis=1).reshape(b, kh * ch)
      h = h + causal.gate(term_l + taps @ tap_kernel_l)
    return h, h_in

  def attend(h, x):
    params, keys, values = x
    q_in, _ = attention_inputs(h, h, pos_p)
    with jax.named_scope("attend_cached"):
      out = attention.apply({"params": params}, q_in, keys, values, p, start,
                            method=_attend)
    return h + out, h

  xs = _map(lambda *x: x, terms_j, earlier, cache.tap_kernels)
  segment_xs = None if attn is None else (attn, cache.keys[:span + 1],
                                          cache.values[:span + 1])
  h, h_ins, attn_in = _through_layers(step, h, xs, after_segment=attend,
                                      segment_xs=segment_xs)
  hrow = _map(lambda r, e: lax.dynamic_update_slice_in_dim(r, e[..., None, :], j + kh - 1,
                                                           r.ndim - 2), cache.hrow, h_ins)
  logits = m.output(h, train=False).astype(jnp.float32)  # [B, K]
  return logits, cache.replace(hrow=hrow, attn_in=() if attn is None else attn_in)


def feed(m, cache: DecodeCache, p: jax.Array, code: jax.Array, span: int) -> DecodeCache:
  """prior_decoding.feed with every attention block's keys and values at once."""
  kx, dt = m.kernel_size // 2, m.dtype
  p = jnp.asarray(p, jnp.int32)
  j = p % cache.shape[2]
  x_p = m.embed(code)
  xrow = lax.dynamic_update_slice_in_dim(cache.xrow, x_p[:, None].astype(dt), j + kx - 1, 1)
  _, attn = _stack_params(m)
  if attn is None:
    return cache.replace(xrow=xrow)
  pos_p = _position_features(cache, p)
  attention = _attention(m)

  def keys_values(params, h_a):  # one block: [B, heads, d] each
    _, kv_in = attention_inputs(h_a, x_p, pos_p)
    return attention.apply({"params": params}, kv_in, method="keys_values")

  key, val = jax.vmap(keys_values)(attn, cache.attn_in)  # [S, B, heads, d]
  index = p - _span_start(cache, span)
  with jax.named_scope("cache_update"):
    write = lambda chunks, e: chunks[:span] + (lax.dynamic_update_slice_in_dim(
        chunks[span], e[..., None, :].astype(dt), index, 3),) + chunks[span + 1:]
    return cache.replace(xrow=xrow, keys=write(cache.keys, key),
                         values=write(cache.values, val))
