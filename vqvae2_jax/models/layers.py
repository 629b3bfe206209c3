"""Convolution building blocks shared by the VQ-VAE encoder and decoder.

Every kernel carries logical axis names ('kh', 'kw', 'embed', 'mlp') so parameters can
be sharded by rules kept in the config (see `vqvae2_jax.parallel`).
"""
from __future__ import annotations

from typing import Any

import einops
import jax
import jax.numpy as jnp
import flax.linen as nn

from vqvae2_jax.models.fast_conv import FastConv, FastConvTranspose
from vqvae2_jax.models.names import (REMAT_NONE, UPSAMPLE_MODES, UPSAMPLE_RESIZE,
                                     UPSAMPLE_SUBPIXEL, UPSAMPLE_TRANSPOSE)
from vqvae2_jax.models.remat import maybe_remat

Dtype = Any


def _kernel_init():
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("kh", "kw", "embed", "mlp"))


def _bias_init():
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",))


class Conv(FastConv):
  """FastConv under nn.Conv's class name: Flax names unnamed submodules after their class
  ('Conv_0', 'Conv_1', ...), so parameter paths and checkpoints stay those of nn.Conv."""


class ConvTranspose(FastConvTranspose):
  """FastConvTranspose under nn.ConvTranspose's class name (same parameter paths)."""


def conv(features: int, kernel: int, *, stride: int = 1, dtype: Dtype = jnp.float32,
         name: str | None = None) -> nn.Module:
  """A 'SAME'-padded k x k convolution with float32 params and logical axis names.

  `FastConv` (nn.Conv's parameters; `fast_conv.fast_gradient_pays` decides per layer
  whether its kernel gradient is one matmul, on CPU, or XLA's own, on accelerators).
  """
  return Conv(features, (kernel, kernel), strides=(stride, stride), dtype=dtype,
              kernel_init=_kernel_init(), bias_init=_bias_init(), name=name)


class Upsample2x(nn.Module):
  """Doubles height and width: x float [B, H, W, C] -> [B, 2H, 2W, features].

  mode: 'transpose' is the paper's 4x4 stride-2 transposed convolution (`FastConvTranspose`,
  whose kernel gradient avoids XLA's slow CPU lowering where it pays); 'subpixel'
  (3x3 conv to 4*features, then depth-to-space) and 'resize' (nearest x2, then 3x3 conv)
  compute the same shapes with fewer FLOPs.
  """
  features: int
  mode: str = UPSAMPLE_TRANSPOSE
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mode == UPSAMPLE_TRANSPOSE:
      return ConvTranspose(self.features, (4, 4), strides=(2, 2), dtype=self.dtype,
                           kernel_init=_kernel_init(), bias_init=_bias_init())(x)
    if self.mode == UPSAMPLE_SUBPIXEL:
      y = conv(4 * self.features, 3, dtype=self.dtype)(x)
      return einops.rearrange(y, "b h w (r s c) -> b (h r) (w s) c", r=2, s=2)
    if self.mode == UPSAMPLE_RESIZE:
      b, h, w, c = x.shape
      y = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
      return conv(self.features, 3, dtype=self.dtype)(y)
    raise ValueError(f"unknown upsample mode {self.mode!r}; use one of {UPSAMPLE_MODES}")


class ResidualStack(nn.Module):
  """`num_layers` blocks x + conv1x1(relu(conv3x3(relu(x)))), then a ReLU.

  The 3x3 conv has `res_hidden` channels (the paper's "residual units"); the stream
  keeps the input's channel count ("hidden units"). remat: 'none' | 'block' (recompute
  each block in the backward pass, see models/remat.py; same parameters).
  """
  res_hidden: int
  num_layers: int
  dtype: Dtype = jnp.float32
  remat: str = REMAT_NONE

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block = maybe_remat(ResidualStack.block, self.remat)
    for _ in range(self.num_layers):
      x = block(self, x)
    return nn.relu(x)

  def block(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> x + conv1x1(relu(conv3x3(relu(x)))), same shape."""
    h = conv(self.res_hidden, 3, dtype=self.dtype)(nn.relu(x))
    return x + conv(x.shape[-1], 1, dtype=self.dtype)(nn.relu(h))


class Encoder(nn.Module):
  """Downsamples by 2**num_down with strided 4x4 convs, then a residual stack.

  x: float [B, H, W, C] -> [B, H / 2**num_down, W / 2**num_down, hidden].
  """
  hidden: int
  res_hidden: int
  num_res_layers: int
  num_down: int
  dtype: Dtype = jnp.float32
  remat: str = REMAT_NONE

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_down):
      width = self.hidden // 2 if i < self.num_down - 1 else self.hidden
      x = nn.relu(conv(width, 4, stride=2, dtype=self.dtype)(x))
    x = conv(self.hidden, 3, dtype=self.dtype)(x)
    return ResidualStack(self.res_hidden, self.num_res_layers, self.dtype, self.remat)(x)


class Decoder(nn.Module):
  """A 3x3 conv and residual stack, then `num_up` x2 upsamplings to `out_channels`.

  x: float [B, h, w, C] -> [B, h * 2**num_up, w * 2**num_up, out_channels].
  """
  out_channels: int
  hidden: int
  res_hidden: int
  num_res_layers: int
  num_up: int
  upsample: str = UPSAMPLE_TRANSPOSE
  dtype: Dtype = jnp.float32
  remat: str = REMAT_NONE

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = conv(self.hidden, 3, dtype=self.dtype)(x)
    x = ResidualStack(self.res_hidden, self.num_res_layers, self.dtype, self.remat)(x)
    for i in range(self.num_up):
      last = i == self.num_up - 1
      x = Upsample2x(self.out_channels if last else self.hidden // 2, self.upsample,
                     self.dtype)(x)
      if not last:
        x = nn.relu(x)
    return x
