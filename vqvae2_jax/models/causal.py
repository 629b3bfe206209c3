"""Causal building blocks of the PixelCNN-family priors (raster order over [H, W]).

Convolutions are written as pad-and-shift (the PixelCNN++ family), never as masked
kernels, so every kernel tap is used and causality follows from the padding alone:

* `CausalConv(mode='down')`: pads ((kh-1, 0), (kw//2, kw//2)); output (i, j) sees input
  rows i-kh+1..i, columns j-kw//2..j+kw//2. Followed by `down_shift` it sees only rows < i.
* `CausalConv(mode='down_right')`: pads ((kh-1, 0), (kw-1, 0)); output (i, j) sees rows
  i-kh+1..i, columns j-kw+1..j. Followed by `right_shift` it sees only (i, < j) on row i.

Each convolution can also be applied to an input that is already padded (`prepadded=True`),
which is how the prior's decoding step (`models/prior_decoding.py`) evaluates a kernel on
one row or one position from its cache with the very same parameters.

`CausalSelfAttention` is PixelSNAIL-style multi-head attention over the raster order with
a strict mask (position p attends to positions < p), so keys and values may include the
embedded input at their own position. Position 0 has nothing to attend to: its output is
exactly zero (no NaN).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from vqvae2_jax.models import fast_conv
from vqvae2_jax.models.remat import SAVED_NAMES

Dtype = Any

CONV_MODES = ("down", "down_right")
_NEG_INF = -1e9  # finite, so fully masked rows stay NaN-free
ATTENTION_WEIGHTS = SAVED_NAMES[0]  # saved, not recomputed, under remat (models/remat.py)


def conv_kernel_init(scale: float = 1.0):
  """Kernel initializer [kh, kw, Cin, Cout] with logical axes ('kh', 'kw', 'embed', 'mlp')."""
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal"),
      ("kh", "kw", "embed", "mlp"))


def dense_kernel_init(scale: float = 1.0, names: tuple[str, str] = ("embed", "mlp")):
  """Dense kernel initializer [Cin, Cout] with logical axes `names`."""
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal"), names)


def bias_init(names: tuple[str, ...] = ("mlp",)):
  """Zero bias initializer with logical axes `names`."""
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def dense(features: int, *, dtype: Dtype, scale: float = 1.0, use_bias: bool = True,
          names: tuple[str, str] = ("embed", "mlp"), name: str | None = None) -> nn.Dense:
  """A 1x1 layer (nn.Dense) with float32 params and logical axis names."""
  bias_names = (names[1],)
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=dense_kernel_init(scale, names),
                  bias_init=bias_init(bias_names), name=name)


def down_shift(x: jax.Array) -> jax.Array:
  """Shifts x [B, H, W, C] down by one row, filling row 0 with zeros."""
  return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def right_shift(x: jax.Array) -> jax.Array:
  """Shifts x [B, H, W, C] right by one column, filling column 0 with zeros."""
  return jnp.pad(x, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]


def conv_padding(mode: str, kernel_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """((top, bottom), (left, right)) zero padding of a causal conv with this kernel."""
  kh, kw = kernel_size
  if mode == "down":
    if kw % 2 != 1:
      raise ValueError(f"mode 'down' needs an odd kernel width, got {kernel_size}")
    return ((kh - 1, 0), (kw // 2, kw // 2))
  if mode == "down_right":
    return ((kh - 1, 0), (kw - 1, 0))
  raise ValueError(f"unknown causal conv mode {mode!r}; use one of {CONV_MODES}")


class CausalConv(nn.Module):
  """Down- or down-right-shifted convolution (stride 1, output size = input size).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    mode: 'down' or 'down_right' (see the module docstring).
    dtype: compute dtype; params are float32.
  """
  features: int
  kernel_size: tuple[int, int]
  mode: str = "down"
  dtype: Dtype = jnp.float32

  @property
  def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) causal zero padding of this conv."""
    return conv_padding(self.mode, self.kernel_size)

  @nn.compact
  def __call__(self, x: jax.Array, prepadded: bool = False) -> jax.Array:
    """Applies the causal conv.

    Args:
      x: float [B, H, W, Cin]; or, with prepadded=True, a slice of the zero-padded input
        [B, kh-1+R, Wp, Cin] (R output rows, Wp = output width + left + right padding).
        A slice of exactly [B, kh, kw, Cin] gives the single output position [B, Cout].
      prepadded: whether x already carries the causal padding.

    Returns:
      [B, H, W, Cout] (or [B, R, Wp-kw+1, Cout]; or [B, Cout] for one position).
    """
    kh, kw = self.kernel_size
    kernel = self.param("kernel", conv_kernel_init(), (kh, kw, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", bias_init(), (self.features,), jnp.float32)
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    if prepadded and x.shape[1:3] == (kh, kw):
      # One output position: a plain matmul is much cheaper than a conv call.
      y = x.reshape(x.shape[0], -1) @ kernel.reshape(-1, self.features)
      return y + bias.astype(self.dtype)
    pads = ((0, 0), (0, 0)) if prepadded else self.padding
    if fast_conv.fast_gradient_pays(x.shape[-1], self.features):
      # Same values; the kernel gradient is a matmul instead of XLA's slow CPU lowering.
      y = fast_conv.fast_conv2d(x, kernel, (1, 1), pads)
    else:
      y = lax.conv_general_dilated(x, kernel, (1, 1), pads,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)

  def weights(self) -> tuple[jax.Array, jax.Array]:
    """(kernel [kh, kw, Cin, Cout], bias [Cout]) in the compute dtype (bound, after init):
    for decoding code that splits the kernel's taps."""
    params = nn.meta.unbox(self.variables["params"])
    return params["kernel"].astype(self.dtype), params["bias"].astype(self.dtype)


def gate(a: jax.Array) -> jax.Array:
  """Gated activation: a [..., 2C] -> tanh(a[..., :C]) * sigmoid(a[..., C:]) [..., C]."""
  x, g = jnp.split(a, 2, axis=-1)
  return jnp.tanh(x) * jax.nn.sigmoid(g)


def positional_features(height: int, width: int, num_freqs: int = 4) -> jax.Array:
  """Fixed positional signal for raster positions: float32 [H*W, 2 + 4*num_freqs].

  Centered row/column coordinates (PixelSNAIL's "background") plus sin/cos of them at
  octave frequencies, so dot-product attention can express relative offsets.
  """
  i = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height - 0.5
  j = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width - 0.5
  ii, jj = jnp.meshgrid(i, j, indexing="ij")
  feats = [ii, jj]
  for f in range(num_freqs):
    w = math.pi * (2.0 ** f)
    feats += [jnp.sin(w * ii), jnp.cos(w * ii), jnp.sin(w * jj), jnp.cos(w * jj)]
  return jnp.stack(feats, axis=-1).reshape(height * width, -1)


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention over the raster order with a strict causal mask.

  Attributes:
    features: output width (the residual stream width).
    num_heads: attention heads; features must divide by it.
    attn_dropout: dropout rate on the attention weights (rng 'dropout').
    dtype: compute dtype for projections; logits and softmax are float32.
  """
  features: int
  num_heads: int
  attn_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.features % self.num_heads:
      raise ValueError(f"attention width {self.features} is not divisible by "
                       f"num_heads={self.num_heads}")
    self.query = dense(self.features, dtype=self.dtype)
    self.key = dense(self.features, dtype=self.dtype)
    self.value = dense(self.features, dtype=self.dtype)
    self.out = dense(self.features, dtype=self.dtype)
    self.drop = nn.Dropout(self.attn_dropout)

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[:-1] + (self.num_heads, self.features // self.num_heads))

  def queries(self, q_in: jax.Array) -> jax.Array:
    """q_in float [..., Cq] -> queries [..., heads, d]."""
    return self._heads(self.query(q_in))

  def keys_values(self, kv_in: jax.Array) -> tuple[jax.Array, jax.Array]:
    """kv_in float [..., Ckv] -> (keys, values), each [..., heads, d]."""
    return self._heads(self.key(kv_in)), self._heads(self.value(kv_in))

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, *,
             train: bool) -> jax.Array:
    """Strictly causal attention.

    Args:
      q: [B, Nq, heads, d] queries at raster positions q_pos (int32 [Nq]).
      k, v: [B, Nk, heads, d] keys/values for positions 0..Nk-1 (entries at positions
        >= q_pos are masked, so a cache may hold anything there).
      q_pos: int32 [Nq].
      train: enables dropout on the attention weights.

    Returns:
      float [B, Nq, features]; exactly the output bias where nothing is visible
      (position 0).
    """
    d = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32),
                        k.astype(jnp.float32)) / math.sqrt(d)
    visible = jnp.arange(k.shape[1])[None, :] < q_pos[:, None]  # [Nq, Nk]
    logits = jnp.where(visible[None, None], logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)
    # Rows with no visible key (position 0) would be uniform over masked keys: zero them.
    weights = weights * jnp.any(visible, axis=-1)[None, None, :, None]
    weights = checkpoint_name(weights, ATTENTION_WEIGHTS)  # kept under remat
    weights = self.drop(weights, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v.astype(self.dtype))
    return self.out(out.reshape(out.shape[:2] + (self.features,)))

  def attend_cached(self, q: jax.Array, keys, values, p: jax.Array, start) -> jax.Array:
    """One strictly causal query per batch row over a chunked key/value cache.

    The math of `attend` (float32 scores / sqrt(d), masked softmax, zero weights at
    position 0, the output projection), reading the cache in place: chunks
    [B, heads, n_c, d] of consecutive raster positions, all visible but the last, which
    begins at raster position `start` and is masked to positions < p.

    Args:
      q: [B, heads, d] query at raster position p (int32 scalar).
      keys, values: sequences of chunks [B, heads, n_c, d] (layout of the score
        contraction, so no step transposes them).
      start: raster position of the last chunk's first entry.

    Returns:
      float [B, features].
    """
    d = q.shape[-1]
    qf = q.astype(jnp.float32)
    scores = [jnp.einsum("bhd,bhnd->bhn", qf, kc.astype(jnp.float32)) / math.sqrt(d)
              for kc in keys]
    visible = start + jnp.arange(keys[-1].shape[2]) < p
    scores[-1] = jnp.where(visible, scores[-1], _NEG_INF)
    weights = jax.nn.softmax(jnp.concatenate(scores, -1), axis=-1) * (p > 0)
    splits = np.cumsum([kc.shape[2] for kc in keys[:-1]]).tolist()
    out = sum(jnp.einsum("bhn,bhnd->bhd", w.astype(self.dtype), vc.astype(self.dtype))
              for w, vc in zip(jnp.split(weights, splits, axis=-1), values))
    return self.out(out.reshape(out.shape[0], -1))

  def __call__(self, q_in: jax.Array, kv_in: jax.Array, *, train: bool) -> jax.Array:
    """q_in float [B, N, Cq], kv_in float [B, N, Ckv] -> float [B, N, features]."""
    q = self.queries(q_in)
    k, v = self.keys_values(kv_in)
    return self.attend(q, k, v, jnp.arange(q_in.shape[1]), train=train)
