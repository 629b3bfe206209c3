"""The image-source interface and the factory that builds one from the config.

An `ImageSource` is a random-access list of (image, label) items at one fixed
size; `loader.BatchLoader` turns it into per-process batches (a grain
pipeline). File-backed sources also have `read(index, epoch) -> (image, label,
skip record)` so grain's decode workers can report the unreadable images they
skipped (`errors.BadImagePolicy.read_counted`). Three sources:

- 'demo'   (`demo.DemoSource`): crops of real photographs shipped with
           scikit-image / scikit-learn; works offline everywhere.
- 'folder' (`folders.FolderSource`): ImageNet-style class folders or an
           FFHQ-style flat folder.
- 'tfds'   (`tfds_source.TfdsSource`): a prepared tfds dataset (array_record),
           read without TensorFlow.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import ml_collections
import numpy as np

from vqvae2_jax.data.errors import DataError, no_skips
from vqvae2_jax.registry import (DATA_SOURCES, SOURCE_DEMO, SOURCE_FOLDER, SOURCE_TFDS,
                                 SPLITS, VAL)

__all__ = ["DataError", "ImageSource", "Subset", "make_source", "read_item",
           "spread_indices", "spread_subset"]


@runtime_checkable
class ImageSource(Protocol):
  """Random access to (image, label) items of one split.

  Attributes:
    num_classes: number of classes; 0 when the data has no labels.
    class_names: the class names, len == num_classes.
    num_skipped: unreadable images skipped so far (on_bad_image='skip').
  """

  num_classes: int
  class_names: list[str]
  num_skipped: int

  def __len__(self) -> int:
    """Number of items per epoch."""
    ...

  def get(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
    """Returns (uint8 [S, S, 3] image at the configured size S, int label).

    The label is 0 when the data is unlabelled. `epoch` only matters for
    sources with random augmentation (demo train crops); the same
    (index, epoch) always gives the same item.
    """
    ...


def make_source(data_config: ml_collections.ConfigDict, split: str) -> ImageSource:
  """Builds the image source the config describes.

  Args:
    data_config: the `config.data` ConfigDict (fields: source, image_size,
      root, layout, train_split, val_split, flat_val_count, tfds_name,
      tfds_data_dir, on_bad_image, demo_train_size, demo_val_size, seed).
    split: 'train' or 'val'; mapped to `train_split` / `val_split`.

  Returns:
    An `ImageSource` of uint8 [S, S, 3] images with S = data_config.image_size.

  Raises:
    ValueError: unknown split or source kind.
    DataError: the data cannot be found or read (the message says what to do).
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}.")
  c = data_config
  size = int(c.image_size)
  if size < 1:
    raise ValueError(f"data.image_size={size}; it must be a positive int.")
  is_val = split == VAL
  split_name = c.val_split if is_val else c.train_split
  kind = c.source
  if kind == SOURCE_DEMO:
    from vqvae2_jax.data import demo  # pylint: disable=g-import-not-at-top
    return demo.DemoSource(
        size, int(c.demo_val_size if is_val else c.demo_train_size),
        is_val=is_val, seed=int(c.seed))
  if kind == SOURCE_FOLDER:
    from vqvae2_jax.data import folders  # pylint: disable=g-import-not-at-top
    return folders.FolderSource(
        c.root, split_name, size, layout=c.layout, train_split=c.train_split,
        is_val=is_val, flat_val_count=int(c.flat_val_count),
        on_bad_image=c.on_bad_image)
  if kind == SOURCE_TFDS:
    from vqvae2_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.TfdsSource(
        c.tfds_name, split_name, size, data_dir=c.tfds_data_dir,
        on_bad_image=c.on_bad_image)
  raise ValueError(f"data.source={kind!r} is not one of {DATA_SOURCES}.")


class Subset:
  """The items `rows` of a source, as a source of its own (same classes)."""

  def __init__(self, source, rows):
    self.source, self.rows = source, np.asarray(rows, np.int64)
    self.num_classes, self.class_names = source.num_classes, source.class_names

  @property
  def num_skipped(self) -> int:
    """Unreadable images the underlying source skipped so far."""
    return self.source.num_skipped

  def __len__(self) -> int:
    return len(self.rows)

  def get(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
    """(uint8 [S, S, 3] image, int label) of row `index` of the subset."""
    return self.source.get(int(self.rows[index]), epoch)

  def read(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int, np.ndarray]:
    """`get` plus the skip record (in the underlying source's item numbers)."""
    return read_item(self.source, int(self.rows[index]), epoch)


def read_item(source, index: int, epoch: int = 0) -> tuple[np.ndarray, int, np.ndarray]:
  """(uint8 [S, S, 3] image, int label, int64 [3] skip record) of any source.

  Sources without a bad-image policy (demo crops, arrays) have only `get`; their
  skip record says nothing was skipped.
  """
  reader = getattr(source, "read", None)
  if reader is not None:
    return reader(index, epoch)
  image, label = source.get(index, epoch)
  return image, label, no_skips()


def spread_indices(n: int, limit: int) -> np.ndarray:
  """`limit` indices spread evenly over range(n) (all of them when limit is 0 or >= n)."""
  if not limit or limit >= n:
    return np.arange(n)
  return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def spread_subset(source, limit: int):
  """`limit` items spread evenly over a source; 0 = all.

  Folder splits are sorted by class, so the first items of a split are one class: a
  validation figure over a limited number of images must spread them instead.
  """
  if not limit or limit >= len(source):
    return source
  return Subset(source, spread_indices(len(source), limit))
