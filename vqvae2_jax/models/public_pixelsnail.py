"""The PixelSNAIL of the public PyTorch VQ-VAE-2 code (rosinality/vq-vae-2-pytorch), in Linen.

Written from that architecture so its trained priors (`train_pixelsnail.py` checkpoints)
run here with the same logits (`vqvae2_jax.import_torch` maps their weights). NHWC layout;
`PixelSNAILPrior`'s call signature, so training, `log_prob` and the reference sampler use
it unchanged.

  x = one_hot(codes, K)                                        [B, H, W, K]
  out = down_shift(Conv_(k'//2, k') pad down (x)) + right_shift(Conv_((k'+1)//2, k'//2)
        pad down-right (x))                                    k' = k (+1 if k is even)
  c = nearest_x2(CondResNet(one_hot(upper codes, K)))          (bottom prior only)
  per block (`num_layers` of them):
    r = out; repeat `res_per_block` times: r = GatedRes_causal_kxk(r, condition=c)
    with attention:  key = GatedRes_1x1([out, r, pos]); query = GatedRes_1x1([r, pos])
                     out = GatedRes_1x1(r, aux=CausalAttention(query, key))
    without:         out = WNConv_1x1([r, pos])
  logits = WNConv_1x1(elu(GatedRes_1x1^num_output_layers(out)))    float32 [B, H, W, K]

  GatedRes(x, aux, condition) = x + GLU(conv2(dropout(elu(conv1(elu(x)) + aux_conv(elu(aux)))))
                                        + cond_conv(condition)),  GLU(a, b) = a * sigmoid(b)
  The causal k x k convs see rows above (whole kernel width) and, on their own row, the
  columns left of the centre only (the public code zeroes those kernel taps). Attention:
  `num_heads` heads (8 in the public code), width hidden // 2, strictly causal (position p attends to < p,
  position 0 outputs zero), masked logits -1e4 as in the public code.
  pos: the public code's two coordinate channels ((i - H/2) / H, (j - W/2) / W).

Every convolution and linear map is weight-normalised like torch.nn.utils.weight_norm
(dim 0): kernel = g * v / ||v||, the norm over all axes but the output one; `v`, `g` and
`bias` are the parameters, so training follows the public code's parametrisation.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
COND_DROPOUT = 0.1  # the public CondResNet's gated blocks keep GatedResBlock's default
ATTENTION_MASK_VALUE = -1e4


def _names_init(init, names):
  return nn.with_logical_partitioning(init, names)


class WNConv(nn.Module):
  """Weight-normalised conv, x float [B, H, W, Cin] -> [B, H', W', features].

  padding: ((top, bottom), (left, right)) zero padding before a VALID conv.
  causal_from: > 0 zeroes the last kernel row's taps from this column on (the public
    'causal' conv); 0 keeps every tap.
  """
  features: int
  kernel: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = True
  causal_from: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel
    v = self.param("v", _names_init(nn.initializers.lecun_normal(),
                                    ("kh", "kw", "embed", "mlp")),
                   (kh, kw, x.shape[-1], self.features), jnp.float32)
    # weight_norm initialises g to ||v||: the initial kernel is v itself.
    g = self.param("g", _names_init(
        lambda *_: jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1, 2))), ("mlp",)))
    if self.causal_from:
      v = v.at[-1, self.causal_from:].set(0.0)
    kernel = v * (g / jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1, 2))))
    y = lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1),
                                 self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", _names_init(nn.initializers.zeros_init(), ("mlp",)),
                         (self.features,), jnp.float32).astype(self.dtype)
    return y


class WNLinear(nn.Module):
  """Weight-normalised linear map on the last axis: [..., Cin] -> [..., features]."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.param("v", _names_init(nn.initializers.lecun_normal(), ("embed", "mlp")),
                   (x.shape[-1], self.features), jnp.float32)
    g = self.param("g", _names_init(lambda *_: jnp.sqrt(jnp.sum(jnp.square(v), 0)),
                                    ("mlp",)))
    b = self.param("bias", _names_init(nn.initializers.zeros_init(), ("mlp",)),
                   (self.features,), jnp.float32)
    kernel = v * (g / jnp.sqrt(jnp.sum(jnp.square(v), 0)))
    return (x.astype(self.dtype) @ kernel.astype(self.dtype)) + b.astype(self.dtype)


def _conv(features: int, kernel: int, kind: str, dtype: Dtype, name: str) -> WNConv:
  """'same': k x k conv padded k//2 all round; 'causal': the public causal conv."""
  if kind == "same":
    return WNConv(features, (kernel, kernel), ((kernel // 2,) * 2,) * 2, dtype=dtype,
                  name=name)
  return WNConv(features, (kernel, kernel), ((kernel - 1, 0), (kernel // 2, kernel // 2)),
                causal_from=kernel // 2, dtype=dtype, name=name)


class GatedResBlock(nn.Module):
  """x [B, H, W, C] (+ aux [B, H, W, A], condition [B, H, W, D]) -> [B, H, W, C]."""
  channel: int
  kernel: int
  kind: str = "same"
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, aux=None, condition=None, *, train: bool):
    c = x.shape[-1]
    out = _conv(self.channel, self.kernel, self.kind, self.dtype, name="conv1")(nn.elu(x))
    if aux is not None:
      out = out + WNConv(self.channel, dtype=self.dtype, name="aux_conv")(nn.elu(aux))
    out = nn.Dropout(self.dropout)(nn.elu(out), deterministic=not train)
    out = _conv(2 * c, self.kernel, self.kind, self.dtype, name="conv2")(out)
    if condition is not None:
      out = out + WNConv(2 * c, use_bias=False, dtype=self.dtype, name="condition")(condition)
    return x + out[..., :c] * jax.nn.sigmoid(out[..., c:])


class CausalAttention(nn.Module):
  """query [B, H, W, Cq], key [B, H, W, Ck] -> [B, H, W, channel]; p attends to < p."""
  channel: int
  num_heads: int = 8
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, key, *, train: bool):
    b, h, w, _ = key.shape
    n, heads, dim = h * w, self.num_heads, self.channel // self.num_heads
    split = lambda t: t.reshape(b, n, heads, dim).transpose(0, 2, 1, 3)
    q = split(WNLinear(self.channel, self.dtype, name="query")(query.reshape(b, n, -1)))
    k = split(WNLinear(self.channel, self.dtype, name="key")(key.reshape(b, n, -1)))
    v = split(WNLinear(self.channel, self.dtype, name="value")(key.reshape(b, n, -1)))
    logits = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(dim)
    allowed = jnp.tril(jnp.ones((n, n), bool), -1)
    logits = jnp.where(allowed, logits, ATTENTION_MASK_VALUE)
    attn = jax.nn.softmax(logits.astype(jnp.float32), -1).astype(logits.dtype)
    attn = attn * (jnp.arange(n) > 0)[:, None].astype(attn.dtype)  # position 0: zero
    attn = nn.Dropout(self.dropout)(attn, deterministic=not train)
    return (attn @ v).transpose(0, 2, 1, 3).reshape(b, h, w, heads * dim)


class PixelBlock(nn.Module):
  """`res_per_block` causal gated blocks, then attention (or a 1x1 conv) with positions."""
  hidden: int
  res_hidden: int
  kernel: int
  res_per_block: int
  attention: bool
  num_heads: int
  dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, background, condition, *, train: bool):
    out = x
    for i in range(self.res_per_block):
      out = GatedResBlock(self.res_hidden, self.kernel, "causal", self.dropout, self.dtype,
                          name=f"resblocks_{i}")(out, condition=condition, train=train)
    if not self.attention:
      return WNConv(self.hidden, dtype=self.dtype, name="out")(
          jnp.concatenate([out, background], -1))
    key = GatedResBlock(self.hidden, 1, dropout=self.dropout, dtype=self.dtype,
                        name="key_resblock")(jnp.concatenate([x, out, background], -1),
                                             train=train)
    query = GatedResBlock(self.hidden, 1, dropout=self.dropout, dtype=self.dtype,
                          name="query_resblock")(jnp.concatenate([out, background], -1),
                                                 train=train)
    attended = CausalAttention(self.hidden // 2, self.num_heads, self.dropout, self.dtype,
                               name="causal_attention")(query, key, train=train)
    return GatedResBlock(self.hidden, 1, dropout=self.dropout, dtype=self.dtype,
                         name="out_resblock")(out, attended, train=train)


def background(height: int, width: int) -> jax.Array:
  """The public code's coordinate channels: float32 [H, W, 2]."""
  rows = (jnp.arange(height, dtype=jnp.float32) - height / 2) / height
  cols = (jnp.arange(width, dtype=jnp.float32) - width / 2) / width
  return jnp.stack([jnp.broadcast_to(rows[:, None], (height, width)),
                    jnp.broadcast_to(cols[None, :], (height, width))], -1)


class PublicPixelSNAIL(nn.Module):
  """The public PixelSNAIL prior over one level's codes (see the module docstring).

  Attributes (the public constructor's names in brackets):
    num_codes: K [n_class]. hidden [channel]. res_hidden [res_channel, and the
      conditioning width cond_res_channel, which train_pixelsnail.py sets to it].
    kernel_size [kernel_size]. num_layers: blocks [n_block]. res_per_block [n_res_block].
    attention [attention]: attention in every block. num_heads: 8 in the public code.
    dropout [dropout] (also on attention weights). num_output_layers [n_out_res_block].
    num_cond_layers [n_cond_res_block]; num_cond_levels: 0 or 1 upper level, at half
    this level's resolution (cond_scales (2,)). cond_kernel [cond_res_kernel].
    num_classes: always 0 (the public priors are unconditional); null_label False.
  """
  num_codes: int
  hidden: int = 256
  res_hidden: int = 256
  kernel_size: int = 5
  num_layers: int = 4
  res_per_block: int = 4
  attention: bool = True
  num_heads: int = 8
  dropout: float = 0.1
  num_output_layers: int = 0
  num_cond_layers: int = 0
  num_cond_levels: int = 0
  cond_scales: tuple[int, ...] = ()
  cond_kernel: int = 3
  dtype: Dtype = jnp.float32
  num_classes: int = 0
  null_label: bool = False

  def _check(self) -> None:
    if self.num_classes:
      raise ValueError("the public PixelSNAIL is unconditional: num_classes must be 0")
    if self.num_cond_levels > 1 or tuple(self.cond_scales) not in ((), (2,)) or (
        self.num_cond_levels and not self.num_cond_layers):
      raise ValueError("the public PixelSNAIL conditions on at most one upper level at "
                       f"half resolution through a CondResNet; got {self.num_cond_levels} "
                       f"levels at scales {self.cond_scales}, {self.num_cond_layers} layers")
    if self.attention and (self.hidden // 2) % self.num_heads:
      raise ValueError(f"attention width hidden // 2 = {self.hidden // 2} must be divisible "
                       f"by num_heads={self.num_heads}")

  @nn.compact
  def __call__(self, codes: jax.Array, cond_codes: Sequence[jax.Array] = (),
               labels: jax.Array | None = None, *, train: bool) -> jax.Array:
    """codes int32 [B, H, W] (+ one upper level [B, H/2, W/2]) -> float32 logits
    [B, H, W, K]. labels: ignored (unconditional)."""
    del labels
    self._check()
    b, h, w = codes.shape
    k = self.kernel_size + 1 if self.kernel_size % 2 == 0 else self.kernel_size
    x = jax.nn.one_hot(codes, self.num_codes, dtype=self.dtype)
    down = WNConv(self.hidden, (k // 2, k), ((k // 2 - 1, 0), (k // 2, k // 2)),
                  dtype=self.dtype, name="horizontal")(x)
    right = WNConv(self.hidden, ((k + 1) // 2, k // 2), (((k + 1) // 2 - 1, 0), (k // 2 - 1, 0)),
                   dtype=self.dtype, name="vertical")(x)
    out = (jnp.pad(down, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :h]
           + jnp.pad(right, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :w])
    pos = jnp.broadcast_to(background(h, w).astype(self.dtype), (b, h, w, 2))
    condition = None
    if self.num_cond_levels:
      if len(cond_codes) != 1:
        raise ValueError(f"this prior needs 1 upper-level code map, got {len(cond_codes)}")
      c = jax.nn.one_hot(cond_codes[0], self.num_codes, dtype=self.dtype)
      c = _conv(self.res_hidden, self.cond_kernel, "same", self.dtype, "cond_in")(c)
      for i in range(self.num_cond_layers):
        c = GatedResBlock(self.res_hidden, self.cond_kernel, "same", COND_DROPOUT,
                          self.dtype, name=f"cond_blocks_{i}")(c, train=train)
      condition = jnp.repeat(jnp.repeat(c, 2, axis=1), 2, axis=2)[:, :h]
    for i in range(self.num_layers):
      out = PixelBlock(self.hidden, self.res_hidden, self.kernel_size, self.res_per_block,
                       self.attention, self.num_heads, self.dropout, self.dtype,
                       name=f"blocks_{i}")(out, pos, condition, train=train)
    for i in range(self.num_output_layers):
      out = GatedResBlock(self.res_hidden, 1, dropout=self.dropout, dtype=self.dtype,
                          name=f"out_blocks_{i}")(out, train=train)
    return WNConv(self.num_codes, dtype=self.dtype, name="logits")(nn.elu(out)).astype(
        jnp.float32)
