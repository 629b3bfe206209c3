"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) as a Linen module.

Architecture and block patches follow pytorch-fid's `FIDInceptionA/C/E_1/E_2`
(identical to torch-fidelity's `InceptionA/C/E_1/E_2`): average pools exclude
the zero padding, and the last block's pool branch is a max pool. Submodule
names mirror the PyTorch attribute names so a state dict maps key for key
(see `convert.py`). BatchNorm uses running statistics (inference only).

Input convention: torch-fidelity's. uint8 images (or floats holding [0, 255]
values) of any size, cast to float32, resized to 299x299 with TensorFlow 1.x
bilinear resizing (`preprocess.resize_bilinear_tf1`), then mapped by
(x - 128) / 128 to [-1, 127/128]. pytorch-fid instead resizes with PyTorch's
bilinear `interpolate` on [0, 1] inputs; both agree exactly at 299x299.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vqvae2_jax.eval import layers
from vqvae2_jax.eval import preprocess

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""
  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """float32 [B, H, W, Cin] -> float32 [B, H', W', features]."""
    x = layers.conv(self.features, self.kernel, stride=self.stride,
                    padding=self.padding, name="conv")(x)
    x = layers.batch_norm(1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jnp.ndarray) -> jnp.ndarray:
  # TensorFlow's average pool does not count padded zeros.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (FIDInceptionA)."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """float32 [B, 35, 35, C] -> float32 [B, 35, 35, 224 + pool_features]."""
    b1 = BasicConv2d(64, 1, name="branch1x1")(x)
    b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction 35 -> 17)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """float32 [B, 35, 35, 288] -> float32 [B, 17, 17, 768]."""
    b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (FIDInceptionC)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """float32 [B, 17, 17, 768] -> float32 [B, 17, 17, 768]."""
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name="branch1x1")(x)
    b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction 17 -> 8)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """float32 [B, 17, 17, 768] -> float32 [B, 8, 8, 1280]."""
    b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, avg pool) and Mixed_7c (FIDInceptionE_2, max pool)."""
  max_pool_branch: bool

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """float32 [B, 8, 8, C] -> float32 [B, 8, 8, 2048]."""
    b1 = BasicConv2d(320, 1, name="branch1x1")(x)
    b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    if self.max_pool_branch:
      # The TF graph's last block max-pools here (a quirk FID depends on).
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """FID Inception-v3: pool3 features and the 1008-way logits.

  Attributes:
    resize_input: resize to 299x299 with TF1 bilinear resizing first; set
      False only when feeding already-resized 299x299 images.
  """
  resize_input: bool = True

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Computes FID / IS features.

    Args:
      images: uint8 [B, H, W, 3] (or float32 holding [0, 255] values).

    Returns:
      dict with 'pool3': float32 [B, 2048] (FID, KID, precision/recall),
      'logits_unbiased': float32 [B, 1008] (pool3 @ W without the bias, what
      the original Inception Score code and torch-fidelity's IS use), and
      'logits': float32 [B, 1008] (with the bias).
    """
    x = preprocess.as_float_pixels(images)
    if self.resize_input:
      x = preprocess.resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
    x = (x - 128.0) / 128.0
    x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool_branch=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
    pool3 = layers.global_avg_pool(x)
    fc = layers.dense(NUM_LOGITS, name="fc")
    logits = fc(pool3)
    # Same product without the bias: reuse the kernel (no second parameter).
    kernel = fc.variables["params"]["kernel"]
    kernel = nn.meta.unbox(kernel)
    logits_unbiased = jnp.matmul(pool3, kernel, precision=layers.PRECISION)
    return {"pool3": pool3, "logits_unbiased": logits_unbiased, "logits": logits}
