"""Shared Linen building blocks of the evaluation networks (inference only)."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Full float32 products on every backend: accelerators otherwise default to
# TF32/bf16 passes, which moves FID by more than the digits people report.
PRECISION = jax.lax.Precision.HIGHEST

_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pads(padding: int | Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch symmetric padding (int or (ph, pw)) -> Flax explicit padding."""
  if isinstance(padding, int):
    padding = (padding, padding)
  return ((padding[0], padding[0]), (padding[1], padding[1]))


def conv(features: int, kernel: int | Sequence[int], *, stride: int = 1,
         padding: Any = 0, use_bias: bool = False, groups: int = 1,
         name: str | None = None) -> nn.Conv:
  """A Conv with PyTorch-style padding and logically partitioned kernel.

  Args:
    features: output channels.
    kernel: kernel size, int or (kh, kw).
    stride: spatial stride.
    padding: int / (ph, pw) symmetric padding, or a Flax padding string
      ('SAME' is TensorFlow's asymmetric SAME padding).
    use_bias: whether the conv has a bias.
    groups: feature groups (channels for a depthwise conv).
    name: submodule name (mirrors the PyTorch attribute name).
  """
  if isinstance(kernel, int):
    kernel = (kernel, kernel)
  pad = padding if isinstance(padding, str) else _pads(padding)
  return nn.Conv(
      features, tuple(kernel), strides=(stride, stride), padding=pad,
      use_bias=use_bias, feature_group_count=groups, precision=PRECISION,
      kernel_init=nn.with_logical_partitioning(_CONV_INIT,
                                               ("kh", "kw", "embed", "mlp")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
      name=name)


def dense(features: int, *, use_bias: bool = True, name: str | None = None) -> nn.Dense:
  """A Dense layer with logically partitioned kernel and bias."""
  return nn.Dense(
      features, use_bias=use_bias, precision=PRECISION,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               ("embed", "mlp")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
      name=name)


def batch_norm(eps: float, name: str | None = None) -> nn.BatchNorm:
  """Inference BatchNorm: normalises with the running statistics in `batch_stats`."""
  return nn.BatchNorm(use_running_average=True, epsilon=eps, name=name)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """float [B, H, W, C] -> float [B, C]."""
  return jnp.mean(x, axis=(1, 2))


def group_norm(channels: int, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with up to 32 groups dividing `channels`; partitioned scale/bias."""
  groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
  return nn.GroupNorm(
      groups,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
      name=name)


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv (no bias) with TensorFlow 'SAME' padding.

  The kernel has nn.Conv's grouped layout [k, k, 1, C]. On CPU it runs as a
  sum of k*k shifted, scaled copies of the input, ~8x faster there than
  XLA's grouped convolution; other backends use the native grouped conv.

  Attributes:
    kernel_size: k.
    stride: spatial stride.
    impl: 'auto' (by backend), 'native' or 'shifted'.
  """
  kernel_size: int
  stride: int = 1
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """float32 [B, H, W, C] -> float32 [B, ceil(H/s), ceil(W/s), C]."""
    k, s, c = self.kernel_size, self.stride, x.shape[-1]
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(_CONV_INIT, ("kh", "kw", "embed", "mlp")),
        (k, k, 1, c), jnp.float32)
    impl = self.impl
    if impl == "auto":
      impl = "shifted" if jax.default_backend() == "cpu" else "native"
    if impl not in ("native", "shifted"):
      raise ValueError(f"impl must be 'auto', 'native' or 'shifted', got {self.impl!r}")
    if impl == "native":
      return jax.lax.conv_general_dilated(
          x, kernel, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=c, precision=PRECISION)
    _, h, w, _ = x.shape
    oh, ow = -(-h // s), -(-w // s)
    pad_h, pad_w = max((oh - 1) * s + k - h, 0), max((ow - 1) * s + k - w, 0)
    xp = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                     (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    out = None
    for i in range(k):
      for j in range(k):
        tap = xp[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :] * kernel[i, j, 0]
        out = tap if out is None else out + tap
    return out
