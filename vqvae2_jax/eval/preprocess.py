"""Input conventions of the evaluation networks: dtype checks and resizing.

The reference FID / precision-recall code (torch-fidelity) feeds uint8 images,
casts them to float32 and resizes them with TensorFlow 1.x's bilinear resize
(`align_corners=False`, no half-pixel centres, no antialiasing). That resize is
what the original TensorFlow FID / IS code did inside the Inception graph, so
published numbers depend on it. `resize_bilinear_tf1` reproduces it op for op
(same float32 source coordinates and the same lerp order), which is why the
Inception and VGG ports agree with torch-fidelity on non-299/224 inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def as_float_pixels(images: jnp.ndarray) -> jnp.ndarray:
  """Casts images to float32 pixel values in [0, 255].

  Args:
    images: uint8 [B, H, W, 3], or a float array already holding values in
      [0, 255] (floats are passed through; quantise generated samples to uint8
      first to follow the published protocols exactly).

  Returns:
    float32 [B, H, W, 3].
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"expected NHWC RGB images [B, H, W, 3], got shape {tuple(images.shape)}")
  return images.astype(jnp.float32)


def _tf1_source_coords(in_size: int, out_size: int):
  """Integer neighbours and float32 weights of TF1 bilinear resizing (one axis)."""
  # Same arithmetic as torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`
  # (method='slow'): float32(i) * float32(in / out), truncated.
  scale = np.float32(in_size / out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = src.astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def resize_bilinear_tf1(images: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """TensorFlow 1.x bilinear resize (align_corners=False), as torch-fidelity does.

  Args:
    images: float32 [B, H, W, C].
    size: (out_height, out_width).

  Returns:
    float32 [B, out_height, out_width, C]. Returns `images` unchanged when the
    size already matches (the TF1 resize is then the identity).
  """
  _, h, w, _ = images.shape
  oh, ow = size
  if (h, w) == (oh, ow):
    return images
  y_lo, y_hi, dy = _tf1_source_coords(h, oh)
  x_lo, x_hi, dx = _tf1_source_coords(w, ow)
  rows_lo = jnp.take(images, y_lo, axis=1)
  rows_hi = jnp.take(images, y_hi, axis=1)
  in_00 = jnp.take(rows_lo, x_lo, axis=2)
  in_01 = jnp.take(rows_lo, x_hi, axis=2)
  in_10 = jnp.take(rows_hi, x_lo, axis=2)
  in_11 = jnp.take(rows_hi, x_hi, axis=2)
  dx = jnp.asarray(dx)[None, None, :, None]
  dy = jnp.asarray(dy)[None, :, None, None]
  in_0 = in_00 + (in_01 - in_00) * dx
  in_1 = in_10 + (in_11 - in_10) * dx
  return in_0 + (in_1 - in_0) * dy


def resize_bilinear_antialiased(images: jnp.ndarray,
                                size: tuple[int, int]) -> jnp.ndarray:
  """Bilinear resize with antialiasing when shrinking (PIL-like).

  Used for the EfficientNet-Lite0 classifier, which has no reference resize
  to match; antialiasing keeps large images (e.g. 1024x1024 FFHQ samples)
  from aliasing on the way to 224x224.

  Args:
    images: float32 [B, H, W, C].
    size: (out_height, out_width).

  Returns:
    float32 [B, out_height, out_width, C].
  """
  b, h, w, c = images.shape
  if (h, w) == tuple(size):
    return images
  return jax.image.resize(images, (b, size[0], size[1], c), method="bilinear",
                          antialias=True)
