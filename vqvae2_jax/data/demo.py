"""A tiny offline dataset of real photographs, for laptops, tests and notebooks.

The photographs are the sample images shipped inside scikit-image and
scikit-learn, so nothing is downloaded: scikit-image's astronaut, camera,
chelsea, coffee, coins, hubble_deep_field, immunohistochemistry, moon, retina,
rocket, brick, grass, gravel and the left view of stereo_motorcycle
(only those that load from the installed wheel; scikit-image ships others that
need an extra download and are never used), plus scikit-learn's
`load_sample_images()` (china, flower). Greyscale photos are repeated to RGB.
They are loaded once per process and cached.

Label = photo index (in the order above), class_names = photo names.

Each photo is split by width into a LEFT 80% train region and a RIGHT 20%
validation strip (boundary `x_split = floor(0.8 * width)`), so no validation
pixel is ever seen in training:

- Train item i (of `demo_train_size` per epoch) uses photo `i % num_photos`
  and a random square crop inside the train region: side uniform in
  [35%, 90%] of the region's short side, uniform position, horizontal flip
  with probability 1/2. The randomness comes from
  `np.random.default_rng([seed, epoch, i])`: an item is the same for the same
  (seed, epoch, i) and differs between epochs.
- Val item j (of `demo_val_size`) uses photo `j % num_photos` and a fixed
  square crop of the validation strip (side = strip width), the k-th
  (k = j // num_photos) of the photo's crops spaced evenly from top to bottom;
  never flipped, identical in every epoch and for every seed.

Crops are resized to S x S with PIL (bicubic, antialiased when shrinking;
`reducing_gap=3` for speed on the large photographs).
`DemoSource.crop_box` exposes the boxes so tests can check the split.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

from absl import logging
import numpy as np
from PIL import Image

# scikit-image photographs stored inside its wheel (no pooch download needed).
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins",
                  "hubble_deep_field", "immunohistochemistry", "moon", "retina",
                  "rocket", "brick", "grass", "gravel", "stereo_motorcycle")
TRAIN_FRACTION = 0.8
MIN_CROP, MAX_CROP = 0.35, 0.9
# Large crops are first shrunk by an integer box filter to >= 3x the target,
# then resampled: several times faster, visually indistinguishable (PIL docs).
RESIZE_REDUCING_GAP = 3.0


class CropBox(NamedTuple):
  """A square crop of photo `photo`: pixels [y0, y0+side) x [x0, x0+side)."""
  photo: int
  x0: int
  y0: int
  side: int
  flip: bool


def _to_rgb(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img)
  if img.dtype != np.uint8:
    raise ValueError(f"expected a uint8 photo, got {img.dtype}")
  if img.ndim == 2:
    img = np.repeat(img[:, :, None], 3, axis=2)
  return np.ascontiguousarray(img[:, :, :3])


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
  """Loads the demo photographs once per process.

  Returns:
    (names, photos): photos are uint8 [H, W, 3] arrays of various sizes.
  """
  import skimage.data  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  names, photos = [], []
  for name in SKIMAGE_PHOTOS:
    try:
      img = getattr(skimage.data, name)()
    except Exception as e:  # pylint: disable=broad-except
      # A scikit-image release that moved a photo into its download-only set.
      logging.warning("Demo data: skipping skimage.data.%s (%s).", name, e)
      continue
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
      img = img[0]
    names.append(name)
    photos.append(_to_rgb(img))
  try:
    bunch = load_sample_images()
    for filename, img in zip(bunch.filenames, bunch.images):
      names.append(filename.replace("\\", "/").rsplit("/", 1)[-1].split(".")[0])
      photos.append(_to_rgb(img))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Demo data: skipping scikit-learn sample images (%s).", e)
  if not photos:
    raise RuntimeError(
        "No demo photographs could be loaded from scikit-image / scikit-learn; "
        "reinstall them (pip install scikit-image scikit-learn).")
  for p in photos:
    p.setflags(write=False)
  return tuple(names), tuple(photos)


def train_width(width: int) -> int:
  """Width of the train region [0, train_width) of a photo `width` wide."""
  return int(math.floor(TRAIN_FRACTION * width))


class DemoSource:
  """Random train crops / fixed val crops of the demo photographs."""

  def __init__(self, image_size: int, num_items: int, *, is_val: bool = False,
               seed: int = 0):
    """Creates the source.

    Args:
      image_size: the output side S.
      num_items: items per epoch (`demo_train_size` or `demo_val_size`).
      is_val: fixed crops of the right strips instead of random left crops.
      seed: seeds the train crops (val crops do not depend on it).
    """
    if num_items < 1:
      raise ValueError(f"demo source needs >= 1 item, got {num_items}; set "
                       "--config.data.demo_train_size / demo_val_size.")
    names, self._photos = load_photos()
    self.class_names = list(names)
    self.num_classes = len(names)
    self.num_skipped = 0
    self.image_size = int(image_size)
    self.is_val = is_val
    self.seed = int(seed)
    self._num_items = int(num_items)

  def __len__(self) -> int:
    return self._num_items

  def crop_box(self, index: int, epoch: int = 0) -> CropBox:
    """The crop of item `index` in `epoch` (see the module docstring)."""
    if not 0 <= index < self._num_items:
      raise IndexError(f"index {index} out of range [0, {self._num_items})")
    n = self.num_classes
    photo = index % n
    h, w = self._photos[photo].shape[:2]
    x_split = train_width(w)
    if self.is_val:
      side = min(w - x_split, h)
      k = index // n
      count = len(range(photo, self._num_items, n))  # val crops of this photo
      y0 = 0 if count == 1 else round(k * (h - side) / (count - 1))
      return CropBox(photo, x_split, int(y0), int(side), False)
    rng = np.random.default_rng([self.seed, epoch, index])
    short = min(x_split, h)
    side = int(rng.integers(math.ceil(MIN_CROP * short), int(MAX_CROP * short) + 1))
    x0 = int(rng.integers(0, x_split - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    flip = bool(rng.integers(0, 2))
    return CropBox(photo, x0, y0, side, flip)

  def get(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
    """Returns (uint8 [S, S, 3] crop, int photo label) of item `index`."""
    box = self.crop_box(index, epoch)
    pixels = self._photos[box.photo][box.y0:box.y0 + box.side,
                                     box.x0:box.x0 + box.side]
    img = Image.fromarray(pixels).resize(
        (self.image_size, self.image_size), Image.Resampling.BICUBIC,
        reducing_gap=RESIZE_REDUCING_GAP)
    out = np.asarray(img, dtype=np.uint8)
    if box.flip:
      out = out[:, ::-1]
    return np.ascontiguousarray(out), box.photo
