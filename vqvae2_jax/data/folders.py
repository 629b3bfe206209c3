"""Images from folders on disk or in a bucket (`gs://...`, `vqvae2_jax.storage`), in
ImageNet or FFHQ layout.

Two layouts (`data.layout`):

- 'classes' (ImageNet style): `<root>/<split>/<class>/<image>`. Labels are the
  index of the class folder in the sorted list of class folders of the *train*
  split (so train and val share one label space; a val class missing from train
  is an error). Images under a class folder are found recursively.
- 'flat' (FFHQ style): `<root>/<images...>`, found recursively, unlabelled.
  The sorted list is split: validation = its last `flat_val_count` files,
  train = the rest.

Files with extension jpg/jpeg/png/bmp/webp (any case) count as images; hidden
files and folders are ignored. File lists are sorted by relative path and
cached per process. Every image is decoded with PIL, converted to RGB (so
greyscale, palette, CMYK and RGBA inputs all work), its short side resized to S
and the centre S x S square cut out (antialiased bicubic, in one PIL call;
large JPEGs are decoded at a reduced DCT scale first, see `decode_image`).
Unreadable files follow `on_bad_image` (see `errors.BadImagePolicy`).
"""
from __future__ import annotations

import functools
import io
import os
from typing import BinaryIO, Union

import numpy as np
from PIL import Image

from vqvae2_jax import storage

from vqvae2_jax.data.errors import BadImagePolicy, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
  """Resizes the short side to `size` and cuts out the centre square.

  Args:
    img: a PIL image of any mode.
    size: the output side S.

  Returns:
    uint8 [S, S, 3].
  """
  img = img.convert("RGB")
  w, h = img.size
  side = min(w, h)
  # Resizing straight from the centre box equals resize-then-crop but only
  # filters the pixels that survive.
  box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
  # reducing_gap: big images are first shrunk by an integer box filter to
  # >= 3x the target (fast, visually indistinguishable per the PIL docs).
  out = img.resize((size, size), Image.Resampling.BICUBIC, box=box,
                   reducing_gap=3.0)
  return np.asarray(out, dtype=np.uint8)


def decode_image(data: Union[str, bytes, BinaryIO], size: int) -> np.ndarray:
  """Decodes an encoded image (path, bytes or file object) to uint8 [S, S, 3].

  JPEGs are decoded at a reduced DCT scale when that still leaves the short
  side >= S (PIL `draft`), which is much faster for large photographs.
  Raises whatever PIL raises for a damaged file.
  """
  if isinstance(data, str) and storage.is_remote(data):
    with storage.open(data, "rb") as f:
      data = f.read()
  if isinstance(data, bytes):
    data = io.BytesIO(data)
  with Image.open(data) as img:
    img.draft("RGB", (size, size))
    return resize_center_crop(img, size)


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: str) -> list[str]:
  """All image files under `folder` (recursive), sorted by relative path."""
  if storage.is_remote(folder):
    found = sorted(f for f in storage.walk_files(folder) if _is_image(f.split("/")[-1])
                   and not any(d.startswith(".") for d in f.split("/")[:-1]))
    return [storage.join(folder, f) for f in found]
  found = []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      if _is_image(name):
        found.append(os.path.relpath(os.path.join(dirpath, name), folder))
  found.sort()
  return [os.path.join(folder, f) for f in found]


def _class_dirs(split_dir: str) -> list[str]:
  return sorted(d for d in storage.listdir(split_dir)
                if not d.startswith(".") and storage.isdir(storage.join(split_dir, d)))


@functools.lru_cache(maxsize=16)
def _class_listing(root: str, split_dir_name: str, train_split: str
                   ) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
  """(class_names, files, labels int32) of a 'classes' layout split, cached."""
  split_dir = storage.join(root, split_dir_name)
  if not storage.isdir(split_dir):
    raise DataError(
        f"Split folder {split_dir} does not exist. The 'classes' layout expects "
        f"<root>/<split>/<class>/<image>; check --config.data.root and "
        f"--config.data.train_split / --config.data.val_split.")
  names = _class_dirs(split_dir)
  if not names:
    raise DataError(
        f"No class folders in {split_dir}. The 'classes' layout expects "
        f"<root>/<split>/<class>/<image>; for a folder of unlabelled images use "
        f"--config.data.layout=flat.")
  train_dir = storage.join(root, train_split)
  label_names = names
  if split_dir_name != train_split and storage.isdir(train_dir):
    label_names = _class_dirs(train_dir)
    missing = sorted(set(names) - set(label_names))
    if missing:
      raise DataError(
          f"Class folders {missing[:5]} of {split_dir} are not in the train "
          f"split {train_dir}; both splits need the same class folders.")
  files, labels = [], []
  for name in names:
    class_files = _list_images(storage.join(split_dir, name))
    files.extend(class_files)
    labels.extend([label_names.index(name)] * len(class_files))
  if not files:
    raise DataError(
        f"No images ({'/'.join(IMAGE_EXTENSIONS)}) under the class folders of "
        f"{split_dir}.")
  return tuple(label_names), tuple(files), np.asarray(labels, np.int32)


@functools.lru_cache(maxsize=16)
def _flat_listing(root: str) -> tuple[str, ...]:
  """The sorted image files under `root` (recursive), cached."""
  if not storage.isdir(root):
    raise DataError(
        f"Image folder {root} does not exist; set --config.data.root to the "
        f"folder that holds the images.")
  files = _list_images(root)
  if not files:
    raise DataError(
        f"No images ({'/'.join(IMAGE_EXTENSIONS)}) found under {root}; set "
        f"--config.data.root to the folder that holds the images.")
  return tuple(files)


class FolderSource:
  """Images from a folder tree (see the module docstring for the layouts)."""

  def __init__(self, root: str, split_dir: str, image_size: int, *,
               layout: str = "classes", train_split: str = "train",
               is_val: bool = False, flat_val_count: int = 1000,
               on_bad_image: str = "error"):
    """Lists the split's files (cached per process).

    Args:
      root: the data root folder.
      split_dir: the split's folder name under `root` ('classes' layout only).
      image_size: the output side S.
      layout: 'classes' or 'flat'.
      train_split: the train split's folder name; its class folders define the
        labels ('classes' layout only).
      is_val: 'flat' layout: take the validation part (the last
        `flat_val_count` files) instead of the train part.
      flat_val_count: how many files the 'flat' validation part holds.
      on_bad_image: 'error' or 'skip'.
    """
    if not root:
      raise DataError("--config.data.root is empty; set it to the image folder.")
    root = storage.absolute(os.path.expanduser(root))
    if not storage.isdir(root):
      raise DataError(f"Data root {root} does not exist; check --config.data.root.")
    self.image_size = int(image_size)
    if layout == "classes":
      names, files, labels = _class_listing(root, split_dir, train_split)
      self.class_names = list(names)
      self._files = files
      self._labels = labels
    elif layout == "flat":
      every = _flat_listing(root)
      if not 0 < flat_val_count < len(every):
        raise DataError(
            f"{root} holds {len(every)} images but flat_val_count="
            f"{flat_val_count}; both splits need images: set "
            f"--config.data.flat_val_count between 1 and {len(every) - 1}.")
      cut = len(every) - flat_val_count
      self._files = every[cut:] if is_val else every[:cut]
      self._labels = np.zeros(len(self._files), np.int32)
      self.class_names = []
    else:
      raise ValueError(
          f"data.layout={layout!r} is not 'classes' or 'flat'.")
    self.num_classes = len(self.class_names)
    self._policy = BadImagePolicy(on_bad_image, len(self._files))

  @property
  def num_skipped(self) -> int:
    """Distinct unreadable files skipped so far."""
    return self._policy.num_skipped

  @property
  def files(self) -> tuple[str, ...]:
    """The image paths, in index order."""
    return self._files

  def __len__(self) -> int:
    return len(self._files)

  def _decode(self, i: int) -> tuple[np.ndarray, int]:
    return decode_image(self._files[i], self.image_size), int(self._labels[i])

  def get(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
    """Returns (uint8 [S, S, 3] image, int label) of item `index`.

    `epoch` is unused: folder items are the same every epoch.
    """
    image, label, _ = self.read(index, epoch)
    return image, label

  def read(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int, np.ndarray]:
    """`get` plus the skip record of `errors.BadImagePolicy.read_counted`."""
    del epoch
    if not 0 <= index < len(self._files):
      raise IndexError(f"index {index} out of range [0, {len(self._files)})")
    (image, label), skipped = self._policy.read_counted(
        index, self._decode, lambda i: self._files[i])
    return image, label, skipped
