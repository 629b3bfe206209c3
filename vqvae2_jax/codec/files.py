"""Image and stream files for the codec's command line.

Resize policy (the same as the folder data source the models were trained on,
data/folders.py): an image of exactly S x S is used as it is; any other size has its
short side resized to S and the centre S x S square cut out (antialiased bicubic), and
the caller is told. Greyscale, palette and RGBA images are converted to RGB. A missing
or unreadable file raises `DataError` naming it; what to do then is the caller's
`on_bad_image` policy ('error' stops, 'skip' warns and goes on). Paths may be bucket URLs
(`vqvae2_jax.storage`).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from vqvae2_jax import storage
from vqvae2_jax.data.errors import DataError
from vqvae2_jax.data.folders import resize_center_crop

STREAM_SUFFIX = ".vq2c"


def read_image(path: str, size: int) -> tuple[np.ndarray, str | None]:
  """(uint8 [S, S, 3], note) of an image file; note says how it was resized, else None."""
  if not storage.isfile(path):
    raise DataError(f"{path}: no such image file")
  try:
    with storage.open(path, "rb") as f, Image.open(f) as img:
      img.load()
      w, h = img.size
      if (w, h) == (size, size):
        return np.asarray(img.convert("RGB"), np.uint8), None
      return resize_center_crop(img, size), (
          f"{path}: {w}x{h} resized to {size}x{size} (short side to {size}, centre crop, "
          "as the data pipeline does)")
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(f"{path}: cannot be read as an image ({e}); pass a PNG/JPEG/WebP "
                    "file") from e


def read_stream(path: str) -> bytes:
  """The bytes of a stream file (DataError naming a missing or unreadable one)."""
  try:
    with storage.open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read the stream file ({e.strerror or e})") from e


def output_path(out_dir: str, source: str, suffix: str, taken: set[str]) -> str:
  """out_dir/<source stem><suffix>, numbered when two sources share a stem."""
  stem = os.path.splitext(storage.basename(source))[0]
  path, k = storage.join(out_dir, stem + suffix), 1
  while path in taken:
    path, k = storage.join(out_dir, f"{stem}_{k}{suffix}"), k + 1
  taken.add(path)
  return path


def write_png(path: str, image: np.ndarray) -> None:
  """uint8 [S, S, 3] -> a PNG file (`path` ends in .png)."""
  storage.save_picture(Image.fromarray(np.asarray(image, np.uint8)), path)
