"""Image scaling conventions and PNG grids.

Models see images as float32 in [-1, 1]: x = uint8 / 127.5 - 1. MSE figures are
reported on that scale ("mse") and, for comparison with [0, 1]-scaled numbers, as
mse / 4 ("mse_01"); PSNR is computed for the [0, 1] range.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from vqvae2_jax import storage


def to_model(images) -> jnp.ndarray:
  """uint8 [..., H, W, 3] -> float32 in [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
  """float [..., H, W, 3] in [-1, 1] -> uint8 (clipped, rounded)."""
  x = np.asarray(x, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def psnr_from_mse(mse_model_scale):
  """PSNR in dB of [0, 1] images from an MSE on the [-1, 1] scale."""
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse_model_scale, 1e-12))


def make_grid(images: np.ndarray, cols: int, *, pad: int = 2,
              row_labels: Sequence[str] | None = None,
              captions: Sequence[str] | None = None) -> Image.Image:
  """Tiles uint8 [N, H, W, 3] images into a PIL image, cols per row.

  row_labels: optional text drawn left of each row; captions: text under each tile.
  """
  images = np.asarray(images)
  n, h, w, _ = images.shape
  rows = -(-n // cols)
  label_w = 8 + 7 * max((len(s) for s in row_labels), default=0) if row_labels else 0
  cap_h = 12 if captions else 0
  canvas = Image.new("RGB", (label_w + cols * (w + pad) + pad,
                             rows * (h + pad + cap_h) + pad), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    r, c = divmod(i, cols)
    x0, y0 = label_w + pad + c * (w + pad), pad + r * (h + pad + cap_h)
    canvas.paste(Image.fromarray(images[i]), (x0, y0))
    if captions:
      draw.text((x0, y0 + h), str(captions[i])[: max(1, w // 6)], fill=(0, 0, 0))
  for r, label in enumerate(row_labels or ()):
    draw.text((4, pad + r * (h + pad + cap_h) + h // 2 - 5), label, fill=(0, 0, 0))
  return canvas


def save_grid(path: str, images: np.ndarray, cols: int, **kwargs) -> str:
  """Writes `make_grid(...)` as a PNG (creating folders; `path` may be a URL)."""
  return storage.save_picture(make_grid(images, cols, **kwargs), path)


def interleave_rows(*groups: np.ndarray) -> np.ndarray:
  """Stacks groups [N, H, W, 3] so that each group forms one row of the grid."""
  return np.concatenate([np.asarray(g) for g in groups], axis=0)
