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

from vqvae2_jax.models import causal, prior_decoding, prior_decoding_scanned
from vqvae2_jax.models.names import REMAT_NONE
from vqvae2_jax.models.prior_blocks import (CondStack, GatedLayer, GatedStack, OutputStack,
                                            ResBlock, attention_inputs, one_hot_lookup,
                                            table_init)
from vqvae2_jax.models.remat import check_mode as check_remat, maybe_remat

Dtype = Any


def attention_positions(num_layers: int, attention_every: int) -> tuple[int, ...]:
  """0-based gated-layer indices after which an attention block runs."""
  if attention_every <= 0:
    return ()
  return tuple(l for l in range(num_layers) if (l + 1) % attention_every == 0)


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
  remat: str = REMAT_NONE
  # Classifier-free guidance: null_label adds label row `num_classes` (the only effect on
  # the parameter shapes); label_dropout is the probability that training replaces a
  # row's label with it (train mode only). Both off keep the checkpoints of before.
  null_label: bool = False
  label_dropout: float = 0.0
  # Each repeated stack as one nn.scan over stacked parameters (models/prior_blocks.py):
  # compile time and program size independent of depth, in training and in decoding.
  # False: one module per block, the layout of runs recorded before the field.
  scan_layers: bool = True

  def setup(self):
    k, c = self.kernel_size, self.hidden
    check_remat(self.remat)
    if k < 3 or k % 2 != 1:
      raise ValueError(f"kernel_size must be odd and >= 3, got {k}")
    if len(self.cond_scales) != self.num_cond_levels:
      raise ValueError(f"cond_scales {self.cond_scales} must have one entry per upper level "
                       f"(num_cond_levels={self.num_cond_levels})")
    self.embedding = self.param("embedding", table_init(("vocab", "mlp")),
                                (self.num_codes, c), jnp.float32)
    self.in_v = causal.CausalConv(c, (k // 2, k), "down", self.dtype)
    self.in_h = causal.CausalConv(c, (1, k // 2), "down_right", self.dtype)
    conditioned = self.num_cond_levels > 0 or self.num_classes > 0
    self.attn_after = attention_positions(self.num_layers, self.attention_every)
    if self.scan_layers:
      self.stack = GatedStack(c, k, self.dropout, conditioned, self.dtype, self.num_layers,
                              self.attention_every, self.num_heads, self.attn_dropout,
                              self.remat)
      if self.num_output_layers:
        self.out_stack = OutputStack(c, self.res_hidden, self.num_output_layers,
                                     self.dropout, self.dtype, self.remat)
    else:
      self.layers = [GatedLayer(c, k, self.dropout, conditioned, self.dtype)
                     for _ in range(self.num_layers)]
      self.attn = [causal.CausalSelfAttention(c, self.num_heads, self.attn_dropout,
                                              self.dtype) for _ in self.attn_after]
      self.out_blocks = [ResBlock(c, self.res_hidden, self.dropout, 1, self.dtype)
                         for _ in range(self.num_output_layers)]
    self.head = causal.dense(self.num_codes, dtype=jnp.float32, scale=self.head_init_scale,
                             names=("embed", "vocab"))
    if self.num_cond_levels:
      self.cond_stack = CondStack(c, self.res_hidden, self.num_cond_layers, self.cond_scales,
                                  self.num_codes, self.dropout, self.dtype, self.remat,
                                  self.scan_layers)
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
    if self.label_dropout > 0 and not (self.null_label and self.num_classes):
      raise ValueError("label_dropout > 0 needs a class-conditional prior with "
                       "null_label=True (the row the dropped labels map to)")
    if self.num_classes:
      rows = self.num_classes + int(self.null_label)
      self.label_embedding = self.param("label_embedding", table_init(("classes", "mlp")),
                                        (rows, c), jnp.float32)

  # ---- pieces shared by the full forward pass and the decoding step ----

  def embed(self, codes: jax.Array) -> jax.Array:
    """codes int32 [...] -> float [..., hidden]."""
    return one_hot_lookup(self.embedding, codes, self.dtype)

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
      lab = one_hot_lookup(self.label_embedding, labels, self.dtype)[:, None, None, :]
      c = lab if c is None else c + lab
      c = jnp.broadcast_to(c, (b, hgt, wid, self.hidden))
    return c

  def input_streams(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embedded codes x [B, H, W, C] -> initial (v, h), both causal."""
    v = causal.down_shift(self.in_v(x))
    return v, v + causal.right_shift(self.in_h(x))

  def output(self, h: jax.Array, *, train: bool) -> jax.Array:
    """Output stack and head: h [..., C] -> float32 logits [..., K]."""
    if self.scan_layers:
      if self.num_output_layers:
        h = self.out_stack(h, train=train)
    else:
      block = maybe_remat(PixelSNAILPrior._out_block, self._remat(train),
                          static_argnums=(1, 3))
      for i in range(len(self.out_blocks)):
        h = block(self, i, h, train)
    return self.head(nn.elu(h.astype(jnp.float32)))

  # ---- blocks that remat='block' recomputes in the backward pass ----

  def _remat(self, train: bool) -> str:
    return self.remat if train else REMAT_NONE  # nothing to save without a backward pass

  def _out_block(self, i: int, h: jax.Array, train: bool) -> jax.Array:
    return self.out_blocks[i](h, train=train)

  def _gated_layer(self, l: int, v, h, c, train: bool):
    return self.layers[l](v, h, c, train=train)

  def _attention(self, a: int, h: jax.Array, xf: jax.Array, pos: jax.Array,
                 train: bool) -> jax.Array:
    """h + attention block a: h [B, H, W, C], xf [B, H*W, C], pos [B, H*W, P]."""
    b = h.shape[0]
    q_in, kv_in = attention_inputs(h.reshape(b, -1, h.shape[-1]), xf, pos)
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
    if self.scan_layers:
      _, h = self.stack(v, h, c, xf, pos, train=train)
      return self.output(h, train=train)
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


  # ---- decoding one raster position at a time (models/prior_decoding.py) ----
  # The interface of the sampling loop (sampling/incremental.py): in raster order,
  #   cache = init_cache(shape, cond_codes, labels)
  #   per row span s, per row i in it: cache = begin_row(cache, i)
  #     per column j: logits, cache = decode_step(cache, p, span=s)   (p = i * W + j)
  #                   cache = feed(cache, p, code, span=s)            (the code chosen at p)
  # Logits equal the teacher-forced __call__'s at p to float tolerance. A scan_layers=True
  # prior decodes with its stacked parameters, scanning over the layers
  # (models/prior_decoding_scanned.py); False goes through them one module at a time.

  @nn.nowrap
  def _decoding(self):
    """The module of decoding functions for this layout."""
    return prior_decoding_scanned if self.scan_layers else prior_decoding

  @nn.nowrap
  def decode_row_spans(self, shape: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
    """Static row spans [(first row, end row)]; `span` of decode_step / feed indexes it."""
    attention = bool(attention_positions(self.num_layers, self.attention_every))
    return prior_decoding.row_spans(shape[1], attention)

  def init_cache(self, shape: tuple[int, int, int], cond_codes: Sequence[jax.Array] = (),
                 labels: jax.Array | None = None,
                 sharding: jax.sharding.Sharding | None = None) -> prior_decoding.DecodeCache:
    """Empty decoding cache of a (B, H, W) code map; conditioning as in __call__.
    sharding: optional batch-axis sharding imposed on the cache's buffers."""
    return self._decoding().init_cache(self, tuple(shape), tuple(cond_codes), labels, sharding)

  def begin_row(self, cache: prior_decoding.DecodeCache, row: jax.Array
                ) -> prior_decoding.DecodeCache:
    """Row `row` starts (codes of all rows above fed): its per-row work, once."""
    return self._decoding().begin_row(self, cache, row)

  def decode_step(self, cache: prior_decoding.DecodeCache, position: jax.Array, *,
                  span: int) -> tuple[jax.Array, prior_decoding.DecodeCache]:
    """float32 logits [B, K] at raster position `position` (codes before it fed), and the
    cache. span: the static index of the position's row span."""
    return self._decoding().decode_step(self, cache, position, span)

  def feed(self, cache: prior_decoding.DecodeCache, position: jax.Array, code: jax.Array,
           *, span: int) -> prior_decoding.DecodeCache:
    """The code int32 [B] at `position` (after decode_step there) enters the cache."""
    return self._decoding().feed(self, cache, position, code, span)
