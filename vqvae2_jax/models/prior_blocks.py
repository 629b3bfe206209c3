"""The blocks of `PixelSNAILPrior` and its repeated stacks (unrolled or scanned).

Each stack of the prior repeats one block: the gated residual layers (with a causal
attention block after every `attention_every` of them), the 1x1 output blocks and the 3x3
conditioning blocks. With `scan_layers` a stack is one `nn.scan` over stacked parameters
(`models/layer_scan.py`): one traced and compiled body per stack whatever its depth.
Without it the blocks are separate modules (`layers_<l>`, `attn_<a>`, `out_blocks_<i>`,
`cond_stack/ResBlock_<i>`), which the decoding step (`models/prior_decoding.py`) goes
through one layer at a time; a scanned stack's decoding step scans over its stacked
parameters (`models/prior_decoding_scanned.py`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvae2_jax.models import causal
from vqvae2_jax.models.layer_scan import NESTED_LAYER_AXIS, scan_stack
from vqvae2_jax.models.names import REMAT_NONE
from vqvae2_jax.models.remat import maybe_remat
from vqvae2_jax.models.sharding import constrain_batch

Dtype = Any


def table_init(names: tuple[str, str]):
  """Embedding-table initializer N(0, 1) with logical axes `names`."""
  return nn.with_logical_partitioning(nn.initializers.normal(1.0), names)


def one_hot_lookup(table: jax.Array, idx: jax.Array, dtype: Dtype) -> jax.Array:
  """table [N, C], idx int [...] -> [..., C]. One-hot matmul: no gather, so it stays
  valid under any mesh axis type; HIGHEST precision so it selects the rows (in `dtype`)
  exactly, not TF32- or bf16-pass-rounded ones on accelerators."""
  return jnp.matmul(jax.nn.one_hot(idx, table.shape[0], dtype=dtype), table.astype(dtype),
                    precision=jax.lax.Precision.HIGHEST)


def attention_inputs(h: jax.Array, x: jax.Array, pos: jax.Array):
  """Query input [h, pos] and key/value input [h, x, pos] (all [..., *])."""
  pos = pos.astype(h.dtype)
  return (jnp.concatenate([h, pos], -1), jnp.concatenate([h, x.astype(h.dtype), pos], -1))


class GatedLayer(nn.Module):
  """One gated residual layer acting on the vertical (v) and horizontal (h) streams.

  The methods work at any granularity: full maps [B, H, W, C], one row [B, 1, W, C]
  (vertical stream, from a pre-padded cache window) or one position [B, C] (horizontal).
  """
  hidden: int
  kernel_size: int
  dropout: float
  conditioned: bool
  dtype: Dtype = jnp.float32

  def setup(self):
    k, kh = self.kernel_size, self.kernel_size // 2 + 1
    self.v_conv = causal.CausalConv(2 * self.hidden, (kh, k), "down", self.dtype)
    self.h_conv = causal.CausalConv(2 * self.hidden, (kh, kh), "down_right", self.dtype)
    self.link = causal.dense(2 * self.hidden, dtype=self.dtype)
    if self.conditioned:
      self.cond_v = causal.dense(2 * self.hidden, dtype=self.dtype, use_bias=False)
      self.cond_h = causal.dense(2 * self.hidden, dtype=self.dtype, use_bias=False)
    self.drop = nn.Dropout(self.dropout)

  def vertical(self, v: jax.Array, conv_in: jax.Array, c: jax.Array | None, *,
               prepadded: bool, train: bool) -> jax.Array:
    """v [..., C]; conv_in = elu(v) (or its padded cache window); c [..., C] or None."""
    a = self.v_conv(conv_in, prepadded)
    if self.conditioned:
      a = a + self.cond_v(c)
    return v + self.drop(causal.gate(a), deterministic=not train)

  def horizontal(self, h: jax.Array, conv_in: jax.Array, v: jax.Array, c: jax.Array | None,
                 *, prepadded: bool, train: bool) -> jax.Array:
    """h [..., C]; conv_in = elu(h) (or its window); v = this layer's new vertical stream."""
    a = self.h_conv(conv_in, prepadded) + self.link(nn.elu(v))
    if self.conditioned:
      a = a + self.cond_h(c)
    return h + self.drop(causal.gate(a), deterministic=not train)

  def __call__(self, v, h, c, *, train: bool):
    """v, h float [B, H, W, C]; c [B, H, W, C] or None -> new (v, h)."""
    v = self.vertical(v, nn.elu(v), c, prepadded=False, train=train)
    h = self.horizontal(h, nn.elu(h), v, c, prepadded=False, train=train)
    return v, h


class ResBlock(nn.Module):
  """x + dropout(W2 elu(conv(elu(x)))) with inner width `res_hidden`; conv is 1x1 or 3x3."""
  hidden: int
  res_hidden: int
  dropout: float
  kernel: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.kernel == 1:
      y = causal.dense(self.res_hidden, dtype=self.dtype)(nn.elu(x))
    else:
      y = nn.Conv(self.res_hidden, (self.kernel, self.kernel), padding="SAME", dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=causal.conv_kernel_init(),
                  bias_init=causal.bias_init())(nn.elu(x))
    y = causal.dense(self.hidden, dtype=self.dtype)(nn.elu(y))
    return x + nn.Dropout(self.dropout)(y, deterministic=not train)


# ---- scan bodies: (carry, *broadcast) -> (carry, None), `train` fixed per trace ----

class _GatedStep(GatedLayer):
  """A gated layer as a scan body: carry (v, h) [B, H, W, C] each, broadcast c."""
  train: bool = False

  def __call__(self, carry, c):  # pylint: disable=arguments-differ
    return constrain_batch(GatedLayer.__call__(self, *carry, c, train=self.train)), None


class _ResStep(ResBlock):
  """A residual block as a scan body: carry x [B, H, W, C]."""
  train: bool = False

  def __call__(self, x):  # pylint: disable=arguments-differ
    return constrain_batch(ResBlock.__call__(self, x, train=self.train)), None


class _AttentionSegment(nn.Module):
  """`every` gated layers (one inner scan), then a causal attention block on h."""
  hidden: int
  kernel_size: int
  dropout: float
  conditioned: bool
  dtype: Dtype
  every: int
  num_heads: int
  attn_dropout: float
  remat: str
  train: bool = False

  @nn.compact
  def __call__(self, carry, c, xf, pos):
    """carry (v, h) [B, H, W, C]; c as the gated layers; xf [B, H*W, C]; pos [B, H*W, P]."""
    gated = scan_stack(_GatedStep, length=self.every, remat=self.remat, broadcast_args=1,
                       axis=NESTED_LAYER_AXIS)
    (v, h), _ = gated(self.hidden, self.kernel_size, self.dropout, self.conditioned,
                      self.dtype, train=self.train, name="layers")(carry, c)
    attend = maybe_remat(_AttentionSegment.attend, self.remat)
    return (v, attend(self, h, xf, pos)), None

  def attend(self, h: jax.Array, xf: jax.Array, pos: jax.Array) -> jax.Array:
    """h + causal attention over [h, x, pos]: h [B, H, W, C] -> same shape."""
    b = h.shape[0]
    q_in, kv_in = attention_inputs(h.reshape(b, -1, h.shape[-1]), xf, pos)
    attn = causal.CausalSelfAttention(self.hidden, self.num_heads, self.attn_dropout,
                                      self.dtype, name="attn")
    return h + attn(q_in, kv_in, train=self.train).reshape(h.shape)


class GatedStack(nn.Module):
  """The scanned gated stack: `num_layers` gated layers with an attention block after
  every `attention_every` of them (0 = none), as one scan over [gated x every,
  attention] segments plus one scan over the remaining gated layers.

  Parameters: segments/layers/* [S, every, ...], segments/attn/* [S, ...], tail/* [R, ...]
  with S = num_layers // attention_every (0 without attention) and R the rest.
  """
  hidden: int
  kernel_size: int
  dropout: float
  conditioned: bool
  dtype: Dtype
  num_layers: int
  attention_every: int
  num_heads: int
  attn_dropout: float
  remat: str = REMAT_NONE

  @property
  def num_segments(self) -> int:
    return self.num_layers // self.attention_every if self.attention_every > 0 else 0

  @nn.compact
  def __call__(self, v, h, c, xf, pos, *, train: bool):
    """v, h [B, H, W, C]; c [B, H, W, C] or None; xf [B, H*W, C]; pos [B, H*W, P]."""
    remat = self.remat if train else REMAT_NONE
    gated_args = (self.hidden, self.kernel_size, self.dropout, self.conditioned, self.dtype)
    carry = (v, h)
    if self.num_segments:
      segments = scan_stack(_AttentionSegment, length=self.num_segments, remat=REMAT_NONE,
                            broadcast_args=3)
      carry, _ = segments(*gated_args, self.attention_every, self.num_heads,
                          self.attn_dropout, remat, train=train, name="segments")(
                              carry, c, xf, pos)
    rest = self.num_layers - self.num_segments * max(self.attention_every, 0)
    if rest:
      tail = scan_stack(_GatedStep, length=rest, remat=remat, broadcast_args=1)
      carry, _ = tail(*gated_args, train=train, name="tail")(carry, c)
    return carry


def scanned_res_blocks(x: jax.Array, *, length: int, hidden: int, res_hidden: int,
                       dropout: float, kernel: int, dtype: Dtype, remat: str, train: bool,
                       name: str) -> jax.Array:
  """`length` ResBlocks as one scan (call inside a compact method): x [B, H, W, C]."""
  blocks = scan_stack(_ResStep, length=length, remat=remat if train else REMAT_NONE,
                      broadcast_args=0)
  x, _ = blocks(hidden, res_hidden, dropout, kernel, dtype, train=train, name=name)(x)
  return x


class OutputStack(nn.Module):
  """The scanned 1x1 output stack: `num_layers` ResBlocks on h [..., C]."""
  hidden: int
  res_hidden: int
  num_layers: int
  dropout: float
  dtype: Dtype
  remat: str = REMAT_NONE

  @nn.compact
  def __call__(self, h: jax.Array, *, train: bool) -> jax.Array:
    return scanned_res_blocks(h, length=self.num_layers, hidden=self.hidden,
                              res_hidden=self.res_hidden, dropout=self.dropout, kernel=1,
                              dtype=self.dtype, remat=self.remat, train=train, name="blocks")


class CondStack(nn.Module):
  """Upper-level codes -> conditioning features at this level's resolution.

  Attributes:
    hidden, res_hidden: widths (see models/prior.py).
    num_layers: residual blocks.
    scales: per upper level, the integer upsampling factor to this level.
    num_codes: codebook size of the upper levels.
    remat: 'none' | 'block' (recompute each residual block in training's backward pass).
    scan_layers: the blocks as one scan (parameters blocks/* [num_layers, ...]) instead
      of separate ResBlock_<i> modules.
  """
  hidden: int
  res_hidden: int
  num_layers: int
  scales: tuple[int, ...]
  num_codes: int
  dropout: float
  dtype: Dtype = jnp.float32
  remat: str = REMAT_NONE
  scan_layers: bool = False

  @nn.compact
  def __call__(self, cond_codes: Sequence[jax.Array], *, train: bool) -> jax.Array:
    """cond_codes: int32 [B, H/s, W/s] per level (top first) -> float [B, H, W, hidden]."""
    feats = []
    for u, (codes, s) in enumerate(zip(cond_codes, self.scales)):
      table = self.param(f"embedding_{u}", table_init(("vocab", "mlp")),
                         (self.num_codes, self.hidden), jnp.float32)
      e = one_hot_lookup(table, codes, self.dtype)
      b, h, w, ch = e.shape  # nearest upsample as a broadcast: no gather, cheap gradient
      e = jnp.broadcast_to(e[:, :, None, :, None], (b, h, s, w, s, ch)).reshape(
          b, h * s, w * s, ch)
      feats.append(nn.Conv(self.hidden, (3, 3), padding="SAME", dtype=self.dtype,
                           param_dtype=jnp.float32, kernel_init=causal.conv_kernel_init(),
                           bias_init=causal.bias_init(), name=f"upsample_conv_{u}")(e))
    x = causal.dense(self.hidden, dtype=self.dtype, name="merge")(jnp.concatenate(feats, -1))
    if self.scan_layers:
      if self.num_layers:
        x = scanned_res_blocks(x, length=self.num_layers, hidden=self.hidden,
                               res_hidden=self.res_hidden, dropout=self.dropout, kernel=3,
                               dtype=self.dtype, remat=self.remat, train=train, name="blocks")
      return x
    block = maybe_remat(CondStack.block, self.remat if train else REMAT_NONE, static_argnums=(2,))
    for _ in range(self.num_layers):
      x = block(self, x, train)
    return x

  def block(self, x: jax.Array, train: bool) -> jax.Array:
    """One 3x3 residual block of the stack: x [B, H, W, hidden] -> same shape."""
    return ResBlock(self.hidden, self.res_hidden, self.dropout, 3, self.dtype)(x, train=train)
