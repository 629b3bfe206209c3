"""PixelSNAIL-style gated PixelCNN prior over one level of VQ-VAE-2 codes.

Architecture (blind-spot-free two-stream PixelCNN, PixelCNN++ pad-and-shift convs):

  x = embedding[codes]                                   [B, H, W, hidden]
  v = down_shift(ConvDown_(k//2, k)(x))                  vertical stream: rows < i
  h = v + right_shift(ConvDownRight_(1, k//2)(x))        horizontal stream: raster < p
  repeat `num_layers` times (one "layer" of the paper):
    v = v + dropout(gate(ConvDown_(k//2+1, k)(elu(v)) + W_v c))
    h = h + dropout(gate(ConvDownRight_(k//2+1, k//2+1)(elu(h)) + W_link elu(v) + W_h c))
    every `attention_every` layers:
    h = h + CausalSelfAttention(q=[h, pos], kv=[h, x, pos])      (strict mask)
  repeat `num_output_layers` times:  h = h + dropout(W2 elu(W1 elu(h)))    (1x1)
  logits = W_out elu(h)                                  float32 [B, H, W, K]

  gate(a) = tanh(a_1) * sigmoid(a_2), with a = [a_1, a_2] of width 2 * hidden.
  c = CondStack(upper-level codes) + label_embedding[labels]   [B, H, W, hidden]
  With null_label the table has one more row, label `num_classes` ("no class"): training
  with label_dropout > 0 swaps each row's label for it with that probability (rng
  'dropout'), so the same prior also models p(codes | upper levels) for classifier-free
  guidance (Ho & Salimans 2022; sampling/draw.py).
  CondStack: per upper level embed -> nearest upsample by its scale -> 3x3 conv;
  concat -> 1x1 -> `num_cond_layers` residual blocks x + dropout(W2 elu(Conv3x3_res(elu(x)))).

How the paper's hyper-parameters (Tables 3 and 4) map onto the fields:
  "hidden units"   -> `hidden`: width of the embedding, of both residual streams (v, h),
                      of the conditioning features c and of the attention layers; every
                      gated conv maps hidden -> 2 * hidden (the two gate halves).
  "residual units" -> `res_hidden`: inner width of every non-gated residual block, i.e.
                      the 1x1 output-stack blocks (hidden -> res_hidden -> hidden) and the
                      conditioning-stack blocks (3x3 hidden -> res_hidden, 1x1 back).
                      With 0 output layers and no conditioning it is unused.
  "layers"         -> `num_layers`: gated residual layers, each updating v and h once.
  "attention layers" -> num_layers // attention_every attention blocks, placed after every
                      `attention_every` gated layers (Table 3 top: 20 layers, 4 attention
                      layers -> attention_every=5); heads = `num_heads`.
  "Conv Filter size" -> `kernel_size` k: ConvDown kernels are the causal (k//2+1) x k half
                      of a k x k window, ConvDownRight kernels (k//2+1) x (k//2+1).
  "output stack layers" -> `num_output_layers` 1x1 residual blocks on top of h.
  "conditioning stack residual blocks" -> `num_cond_layers`.
  "Dropout"        -> `dropout` after every residual block (gated, output and conditioning
                      stacks); `attn_dropout` on the attention weights.

Parameter counts (float32; tests/test_prior.py prints them from jax.eval_shape, K=512):
  Table 3 ImageNet top (512/2048, 20 layers, 4 x 8-head attention, k=5, 20 output layers,
  1000 classes): 335.8M.  Table 3 ImageNet bottom (512/1024, 20 layers, no attention,
  20 conditioning blocks on a 32x32 top at 64x64, 1000 classes): 395.1M.
  Table 4 FFHQ top / mid / bottom: 272.3M / 333.3M / 193.0M.
  A gated layer at hidden 512 costs 13.1M (ConvDown 3x5: 7.9M, ConvDownRight 3x3: 4.7M,
  link 0.5M) plus 1.0M for its two conditioning projections; an output-stack block 2.1M,
  a conditioning block (3x3 to 1024, 1x1 back) 5.2M, an attention layer 1.6M. The public
  PyTorch VQ-VAE-2 top prior (85M) runs its gated blocks at width 256; the same blocks at
  the paper's 512 hidden units cost 4x as much, i.e. about what is listed here.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvae2_jax.models import causal
from vqvae2_jax.models.remat import check_mode as check_remat, maybe_remat

Dtype = Any


def attention_positions(num_layers: int, attention_every: int) -> tuple[int, ...]:
  """0-based gated-layer indices after which an attention block runs."""
  if attention_every <= 0:
    return ()
  return tuple(l for l in range(num_layers) if (l + 1) % attention_every == 0)


def _table_init(names: tuple[str, str]):
  return nn.with_logical_partitioning(nn.initializers.normal(1.0), names)


def _one_hot_lookup(table: jax.Array, idx: jax.Array, dtype: Dtype) -> jax.Array:
  """table [N, C], idx int [...] -> [..., C]. One-hot matmul: no gather, so it stays
  valid under any mesh axis type; HIGHEST precision so it selects the rows (in `dtype`)
  exactly, not TF32- or bf16-pass-rounded ones on accelerators."""
  return jnp.matmul(jax.nn.one_hot(idx, table.shape[0], dtype=dtype), table.astype(dtype),
                    precision=jax.lax.Precision.HIGHEST)


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


class CondStack(nn.Module):
  """Upper-level codes -> conditioning features at this level's resolution.

  Attributes:
    hidden, res_hidden: widths (see the module docstring).
    num_layers: residual blocks.
    scales: per upper level, the integer upsampling factor to this level.
    num_codes: codebook size of the upper levels.
    remat: 'none' | 'block' (recompute each residual block in training's backward pass).
  """
  hidden: int
  res_hidden: int
  num_layers: int
  scales: tuple[int, ...]
  num_codes: int
  dropout: float
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, cond_codes: Sequence[jax.Array], *, train: bool) -> jax.Array:
    """cond_codes: int32 [B, H/s, W/s] per level (top first) -> float [B, H, W, hidden]."""
    feats = []
    for u, (codes, s) in enumerate(zip(cond_codes, self.scales)):
      table = self.param(f"embedding_{u}", _table_init(("vocab", "mlp")),
                         (self.num_codes, self.hidden), jnp.float32)
      e = _one_hot_lookup(table, codes, self.dtype)
      b, h, w, ch = e.shape  # nearest upsample as a broadcast: no gather, cheap gradient
      e = jnp.broadcast_to(e[:, :, None, :, None], (b, h, s, w, s, ch)).reshape(
          b, h * s, w * s, ch)
      feats.append(nn.Conv(self.hidden, (3, 3), padding="SAME", dtype=self.dtype,
                           param_dtype=jnp.float32, kernel_init=causal.conv_kernel_init(),
                           bias_init=causal.bias_init(), name=f"upsample_conv_{u}")(e))
    x = causal.dense(self.hidden, dtype=self.dtype, name="merge")(jnp.concatenate(feats, -1))
    block = maybe_remat(CondStack.block, self.remat if train else "none", static_argnums=(2,))
    for _ in range(self.num_layers):
      x = block(self, x, train)
    return x

  def block(self, x: jax.Array, train: bool) -> jax.Array:
    """One 3x3 residual block of the stack: x [B, H, W, hidden] -> same shape."""
    return ResBlock(self.hidden, self.res_hidden, self.dropout, 3, self.dtype)(x, train=train)


class PixelSNAILPrior(nn.Module):
  """Gated PixelCNN (+ causal attention) prior p(codes | upper-level codes, class).

  See the module docstring for the architecture and the paper-hyper-parameter mapping.
  Params are float32; activations use `dtype`; logits are float32. remat: 'none' |
  'block' recomputes every gated layer, attention block and residual block in training's
  backward pass (models/remat.py); parameters and values are unchanged.
  """
  num_codes: int = 512
  hidden: int = 128
  res_hidden: int = 128
  num_layers: int = 8
  attention_every: int = 0
  num_heads: int = 4
  kernel_size: int = 5
  dropout: float = 0.1
  attn_dropout: float = 0.1
  num_output_layers: int = 0
  num_cond_layers: int = 0
  num_cond_levels: int = 0
  cond_scales: tuple[int, ...] = ()
  num_classes: int = 0
  dtype: Dtype = jnp.float32
  head_init_scale: float = 0.01  # small output layer: NLL starts near ln(num_codes)
  remat: str = "none"
  # Classifier-free guidance: null_label adds label row `num_classes` (the only effect on
  # the parameter shapes); label_dropout is the probability that training replaces a
  # row's label with it (train mode only). Both off keep the checkpoints of before.
  null_label: bool = False
  label_dropout: float = 0.0

  def setup(self):
    k, c = self.kernel_size, self.hidden
    check_remat(self.remat)
    if k < 3 or k % 2 != 1:
      raise ValueError(f"kernel_size must be odd and >= 3, got {k}")
    if len(self.cond_scales) != self.num_cond_levels:
      raise ValueError(f"cond_scales {self.cond_scales} must have one entry per upper level "
                       f"(num_cond_levels={self.num_cond_levels})")
    self.embedding = self.param("embedding", _table_init(("vocab", "mlp")),
                                (self.num_codes, c), jnp.float32)
    self.in_v = causal.CausalConv(c, (k // 2, k), "down", self.dtype)
    self.in_h = causal.CausalConv(c, (1, k // 2), "down_right", self.dtype)
    conditioned = self.num_cond_levels > 0 or self.num_classes > 0
    self.layers = [GatedLayer(c, k, self.dropout, conditioned, self.dtype)
                   for _ in range(self.num_layers)]
    self.attn_after = attention_positions(self.num_layers, self.attention_every)
    self.attn = [causal.CausalSelfAttention(c, self.num_heads, self.attn_dropout, self.dtype)
                 for _ in self.attn_after]
    self.out_blocks = [ResBlock(c, self.res_hidden, self.dropout, 1, self.dtype)
                       for _ in range(self.num_output_layers)]
    self.head = causal.dense(self.num_codes, dtype=jnp.float32, scale=self.head_init_scale,
                             names=("embed", "vocab"))
    if self.num_cond_levels:
      self.cond_stack = CondStack(c, self.res_hidden, self.num_cond_layers, self.cond_scales,
                                  self.num_codes, self.dropout, self.dtype, self.remat)
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
    if self.label_dropout > 0 and not (self.null_label and self.num_classes):
      raise ValueError("label_dropout > 0 needs a class-conditional prior with "
                       "null_label=True (the row the dropped labels map to)")
    if self.num_classes:
      rows = self.num_classes + int(self.null_label)
      self.label_embedding = self.param("label_embedding", _table_init(("classes", "mlp")),
                                        (rows, c), jnp.float32)

  # ---- pieces shared by the full forward pass and the incremental sampler ----

  def embed(self, codes: jax.Array) -> jax.Array:
    """codes int32 [...] -> float [..., hidden]."""
    return _one_hot_lookup(self.embedding, codes, self.dtype)

  def conditioning(self, cond_codes: Sequence[jax.Array], labels: jax.Array | None,
                   shape: tuple[int, int, int], *, train: bool) -> jax.Array | None:
    """Conditioning features c: float [B, H, W, hidden], or None when unconditional.

    Args:
      cond_codes: int32 [B, H/s, W/s] per upper level (top first).
      labels: int32 [B] (required iff num_classes > 0); with null_label, the value
        num_classes means "no class". In training (train=True) label_dropout of them
        are replaced by it (rng 'dropout').
      shape: (B, H, W) of this level's codes.
    """
    b, hgt, wid = shape
    cond_codes = tuple(cond_codes)
    if len(cond_codes) != self.num_cond_levels:
      raise ValueError(f"expected {self.num_cond_levels} upper-level code maps, got "
                       f"{len(cond_codes)}")
    for u, (cc, s) in enumerate(zip(cond_codes, self.cond_scales)):
      if cc.shape != (b, hgt // s, wid // s) or hgt % s or wid % s:
        raise ValueError(f"cond_codes[{u}] has shape {cc.shape}; with scale {s} and codes "
                         f"{shape} it must be {(b, hgt // s, wid // s)}")
    c = None
    if self.num_cond_levels:
      c = self.cond_stack(cond_codes, train=train)
    if self.num_classes:
      if labels is None:
        raise ValueError(f"this prior is class-conditional (num_classes={self.num_classes}); "
                         "pass labels int32 [B]")
      if labels.shape != (b,):
        raise ValueError(f"labels must be int32 [{b}], got shape {labels.shape}")
      if train and self.label_dropout > 0:
        drop = jax.random.bernoulli(self.make_rng("dropout"), self.label_dropout, (b,))
        labels = jnp.where(drop, self.num_classes, labels)
      lab = _one_hot_lookup(self.label_embedding, labels, self.dtype)[:, None, None, :]
      c = lab if c is None else c + lab
      c = jnp.broadcast_to(c, (b, hgt, wid, self.hidden))
    return c

  def input_streams(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embedded codes x [B, H, W, C] -> initial (v, h), both causal."""
    v = causal.down_shift(self.in_v(x))
    return v, v + causal.right_shift(self.in_h(x))

  def attention_inputs(self, h: jax.Array, x: jax.Array, pos: jax.Array):
    """Query input [h, pos] and key/value input [h, x, pos] (all [..., *])."""
    pos = pos.astype(h.dtype)
    return (jnp.concatenate([h, pos], -1), jnp.concatenate([h, x.astype(h.dtype), pos], -1))

  def output(self, h: jax.Array, *, train: bool) -> jax.Array:
    """Output stack and head: h [..., C] -> float32 logits [..., K]."""
    block = maybe_remat(PixelSNAILPrior._out_block, self._remat(train), static_argnums=(1, 3))
    for i in range(len(self.out_blocks)):
      h = block(self, i, h, train)
    return self.head(nn.elu(h.astype(jnp.float32)))

  # ---- blocks that remat='block' recomputes in the backward pass ----

  def _remat(self, train: bool) -> str:
    return self.remat if train else "none"  # nothing to save without a backward pass

  def _out_block(self, i: int, h: jax.Array, train: bool) -> jax.Array:
    return self.out_blocks[i](h, train=train)

  def _gated_layer(self, l: int, v, h, c, train: bool):
    return self.layers[l](v, h, c, train=train)

  def _attention(self, a: int, h: jax.Array, xf: jax.Array, pos: jax.Array,
                 train: bool) -> jax.Array:
    """h + attention block a: h [B, H, W, C], xf [B, H*W, C], pos [B, H*W, P]."""
    b = h.shape[0]
    q_in, kv_in = self.attention_inputs(h.reshape(b, -1, h.shape[-1]), xf, pos)
    return h + self.attn[a](q_in, kv_in, train=train).reshape(h.shape)

  def __call__(self, codes: jax.Array, cond_codes: Sequence[jax.Array] = (),
               labels: jax.Array | None = None, *, train: bool) -> jax.Array:
    """Teacher-forced logits.

    Args:
      codes: int32 [B, H, W] codes of this level.
      cond_codes: tuple of int32 [B, H/s, W/s] upper-level codes (top first).
      labels: int32 [B] class labels, or None (ignored when num_classes == 0).
      train: enables dropout (rng 'dropout').

    Returns:
      float32 [B, H, W, K]; logits at raster position p depend only on codes at
      positions < p (and on all cond_codes and labels).
    """
    if codes.ndim != 3:
      raise ValueError(f"codes must be int32 [B, H, W], got shape {codes.shape}")
    b, hgt, wid = codes.shape
    c = self.conditioning(cond_codes, labels, (b, hgt, wid), train=train)
    x = self.embed(codes)
    v, h = self.input_streams(x)
    pos = causal.positional_features(hgt, wid)[None]
    xf = x.reshape(b, hgt * wid, -1)
    pos = jnp.broadcast_to(pos, (b,) + pos.shape[1:])
    mode = self._remat(train)
    gated = maybe_remat(PixelSNAILPrior._gated_layer, mode, static_argnums=(1, 5))
    attention = maybe_remat(PixelSNAILPrior._attention, mode, static_argnums=(1, 5))
    a = 0
    for l in range(len(self.layers)):
      v, h = gated(self, l, v, h, c, train)
      if l in self.attn_after:
        h = attention(self, a, h, xf, pos, train)
        a += 1
    return self.output(h, train=train)
