"""Incremental (cached) ancestral sampler for `PixelSNAILPrior`.

Computes only what each new position needs, with the prior's own submodules (called
through `prior.apply(..., method=...)`, so every layer has one definition):

* the conditioning stack (upper levels + class) runs once per sample;
* the vertical stream depends only on rows above, so at the start of row i every gated
  layer's ConvDown is evaluated for the whole row i from a cache of its (padded) input;
* the horizontal stream is evaluated at the new position only: each ConvDownRight keeps a
  padded cache of its input and contracts its kernel with the kh x kw window there;
* each attention layer keeps a key/value cache; keys/values of position p are written
  right after p is sampled (they include the embedded code at p), queries at p attend to
  cached positions < p.

Total work per sample is about one teacher-forced forward pass (plus O(N^2) attention,
the same as the full pass), instead of one pass per position.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vqvae2_jax.models import causal
from vqvae2_jax.models.prior import PixelSNAILPrior, attention_positions
from vqvae2_jax.sampling import draw as draw_lib


class _Geometry:
  """Padded-cache layout of one causal conv (mode, kernel) over an [H, W] grid."""

  def __init__(self, mode: str, kernel: tuple[int, int], height: int, width: int):
    (self.top, _), (self.left, right) = causal.conv_padding(mode, kernel)
    self.kernel = kernel
    self.padded = (height + self.top, width + self.left + right)

  def zeros(self, batch: int, channels: int, dtype) -> jax.Array:
    """An empty cache: zeros [batch, H + top, W + left + right, channels]."""
    return jnp.zeros((batch,) + self.padded + (channels,), dtype)

  def write(self, cache: jax.Array, value: jax.Array, i, j) -> jax.Array:
    """Stores the conv input value [B, C] of grid position (i, j)."""
    return lax.dynamic_update_slice(cache, value[:, None, None, :].astype(cache.dtype),
                                    (0, i + self.top, j + self.left, 0))

  def write_row(self, cache: jax.Array, row: jax.Array, i) -> jax.Array:
    """Stores the conv input row [B, W, C] of grid row i."""
    return lax.dynamic_update_slice(cache, row[:, None].astype(cache.dtype),
                                    (0, i + self.top, self.left, 0))

  def window(self, cache: jax.Array, i, j) -> jax.Array:
    """Padded input window [B, kh, kw, C] that conv output (i, j) reads."""
    b, _, _, c = cache.shape
    return lax.dynamic_slice(cache, (0, i, j, 0), (b,) + self.kernel + (c,))

  def row_window(self, cache: jax.Array, i) -> jax.Array:
    """Padded input rows [B, kh, Wp, C] that conv output row i reads."""
    b, _, wp, c = cache.shape
    return lax.dynamic_slice(cache, (0, i, 0, 0), (b, self.kernel[0], wp, c))


def _at(x: jax.Array, idx, axis: int) -> jax.Array:
  return lax.dynamic_index_in_dim(x, idx, axis=axis, keepdims=False)


@functools.partial(jax.jit, static_argnames=("prior", "shape", "top_k", "return_logits",
                                             "sharding"))
def _sample(prior: PixelSNAILPrior, params, rng, cond_codes, labels, temperature, top_p, *,
            shape, top_k, return_logits, sharding):
  b, hgt, wid = shape
  k, ch, dt = prior.kernel_size, prior.hidden, prior.dtype
  kh = k // 2 + 1
  attn_after = attention_positions(prior.num_layers, prior.attention_every)
  variables = {"params": params}

  def apply(fn, *args):
    return prior.apply(variables, *args, method=fn)

  def constrain(x):
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)

  cond = apply(lambda m, cc, lab: m.conditioning(cc, lab, shape, train=False),
               cond_codes, labels)
  pos = causal.positional_features(hgt, wid)
  g_xv = _Geometry("down", (k // 2, k), hgt, wid)
  g_xh = _Geometry("down_right", (1, k // 2), hgt, wid)
  g_v = _Geometry("down", (kh, k), hgt, wid)
  g_h = _Geometry("down_right", (kh, kh), hgt, wid)
  heads = prior.num_heads
  state = dict(
      codes=constrain(jnp.zeros(shape, jnp.int32)),
      xv=constrain(g_xv.zeros(b, ch, dt)),
      xh=constrain(g_xh.zeros(b, ch, dt)),
      vin=[constrain(g_v.zeros(b, ch, dt)) for _ in range(prior.num_layers)],
      hin=[constrain(g_h.zeros(b, ch, dt)) for _ in range(prior.num_layers)],
      keys=[constrain(jnp.zeros((b, hgt * wid, heads, ch // heads), dt)) for _ in attn_after],
      values=[constrain(jnp.zeros((b, hgt * wid, heads, ch // heads), dt))
              for _ in attn_after],
  )
  if return_logits:
    state["logits"] = constrain(jnp.zeros(shape + (prior.num_codes,), jnp.float32))

  def vertical_rows(m, i, xv, vin):
    """All layers' vertical stream on row i: ([B, W, C] per layer, v0 row, new vin)."""
    v0 = m.in_v(g_xv.row_window(xv, jnp.maximum(i - 1, 0)), True)  # down shift
    v0 = jnp.where(i > 0, v0, jnp.zeros_like(v0))
    c_row = None if cond is None else lax.dynamic_slice_in_dim(cond, i, 1, axis=1)
    v, rows, vin = v0, [], list(vin)
    for l, layer in enumerate(m.layers):
      vin[l] = g_v.write_row(vin[l], nn.elu(v[:, 0]), i)
      v = layer.vertical(v, g_v.row_window(vin[l], i), c_row, prepadded=True, train=False)
      rows.append(v[:, 0])
    return rows, v0[:, 0], vin

  def position(m, i, j, rows, v0, st):
    """Logits at (i, j), then sample it and update every cache that reads code (i, j)."""
    p = i * wid + j
    st = dict(st, hin=list(st["hin"]), keys=list(st["keys"]), values=list(st["values"]))
    hx = m.in_h(g_xh.window(st["xh"], i, jnp.maximum(j - 1, 0)), True)  # right shift
    h = _at(v0, j, 1) + jnp.where(j > 0, hx, jnp.zeros_like(hx))
    c_p = None if cond is None else _at(_at(cond, i, 1), j, 1)
    pos_p = jnp.broadcast_to(pos[p], (b, pos.shape[-1]))
    attn_in, a = [], 0
    for l, layer in enumerate(m.layers):
      st["hin"][l] = g_h.write(st["hin"][l], nn.elu(h), i, j)
      h = layer.horizontal(h, g_h.window(st["hin"][l], i, j), _at(rows[l], j, 1), c_p,
                           prepadded=True, train=False)
      if l in attn_after:
        q_in, _ = m.attention_inputs(h, h, pos_p)
        q = m.attn[a].queries(q_in)[:, None]
        out = m.attn[a].attend(q, st["keys"][a], st["values"][a], p[None], train=False)
        attn_in.append(h)
        h = h + out[:, 0]
        a += 1
    logits = m.output(h, train=False)  # float32 [B, K]
    code = draw_lib.draw(rng, p, logits, temperature, top_k, top_p)
    x_p = m.embed(code)
    st["xv"] = g_xv.write(st["xv"], x_p, i, j)
    st["xh"] = g_xh.write(st["xh"], x_p, i, j)
    for a, h_a in enumerate(attn_in):
      _, kv_in = m.attention_inputs(h_a, x_p, pos_p)
      key, val = m.attn[a].keys_values(kv_in)
      st["keys"][a] = lax.dynamic_update_slice(st["keys"][a], key[:, None].astype(dt),
                                               (0, p, 0, 0))
      st["values"][a] = lax.dynamic_update_slice(st["values"][a], val[:, None].astype(dt),
                                                 (0, p, 0, 0))
    st["codes"] = lax.dynamic_update_slice(st["codes"], code[:, None, None], (0, i, j))
    if return_logits:
      st["logits"] = lax.dynamic_update_slice(st["logits"], logits[:, None, None],
                                              (0, i, j, 0))
    return st

  def row_body(i, st):
    rows, v0, vin = apply(vertical_rows, i, st["xv"], st["vin"])
    inner = dict(st)
    del inner["vin"]  # loop-invariant within a row: keep it out of the inner carry
    inner = lax.fori_loop(0, wid, lambda j, s: apply(position, i, j, rows, v0, s), inner)
    return dict(inner, vin=vin)

  state = lax.fori_loop(0, hgt, row_body, state)
  if return_logits:
    return state["codes"], state["logits"]
  return state["codes"]


def sample_incremental(prior: PixelSNAILPrior, params: Any, rng: jax.Array, *,
                       shape: tuple[int, int, int], cond_codes: Sequence[jax.Array] = (),
                       labels: jax.Array | None = None, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0, return_logits: bool = False,
                       sharding: jax.sharding.Sharding | None = None):
  """Raster-order ancestral sampling with cached convolutions and attention.

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
    return_logits: also return the logits used at every position.
    sharding: optional sharding for the batch axis (e.g. NamedSharding(mesh, P('data')))
      imposed on the canvas and the caches; by default sharding follows the inputs.

  Returns:
    int32 [B, H, W] codes, or (codes, float32 [B, H, W, K] logits) with return_logits.
  """
  shape = draw_lib.check_args(prior, shape, cond_codes, labels, temperature, top_k, top_p)
  return _sample(prior, draw_lib.plain_params(params), rng, tuple(cond_codes), labels,
                 jnp.float32(temperature), jnp.float32(top_p), shape=shape, top_k=top_k,
                 return_logits=bool(return_logits), sharding=sharding)
