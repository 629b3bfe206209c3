"""Images from a prepared TensorFlow Datasets (tfds) dataset, read without TensorFlow.

The dataset is read by name and data_dir (`data.tfds_name`,
`data.tfds_data_dir`; '' = tfds's default `~/tensorflow_datasets`) through
`tfds.builder(...).as_data_source(...)`: random access to array_record files,
which needs no TensorFlow. array_record reads local files only: a data_dir on a bucket
(`gs://...`) has the dataset's folder copied to local disk once
(`vqvae2_jax.storage.local_copy`, under ~/.cache/vqvae2_jax/buckets), and read there. Images are fetched as encoded bytes and decoded with
PIL exactly as the folder source does (RGB, short side -> S, centre crop).
The 'label' feature is optional (unlabelled datasets get label 0); class names
come from the builder's `ClassLabel` feature when it has one. Unreadable images
follow `on_bad_image` like the folder source.

Preparing a dataset (once, needs TensorFlow: `pip install -e .[tf]`), e.g.
ImageNet (ILSVRC-2012), whose archives must be downloaded by hand:

  mkdir -p $DATA_DIR/downloads/manual
  # put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar there, then
  tfds build imagenet2012 --data_dir=$DATA_DIR --file_format=array_record

and pass `--config.data.tfds_data_dir=$DATA_DIR`. imagenet2012's splits are
'train' and 'validation' (`--config.data.val_split=validation`; 'val' is
mapped to 'validation' automatically when the dataset has no 'val' split).
A dataset that is missing, unprepared, or prepared as tfrecord raises a
`DataError` that repeats these steps.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import numpy as np

from vqvae2_jax import storage
from vqvae2_jax.data.errors import BadImagePolicy, DataError
from vqvae2_jax.data.folders import decode_image


def _prepare_help(name: str, data_dir: str) -> str:
  where = data_dir or "~/tensorflow_datasets"
  steps = (
      f"prepare it once (this needs TensorFlow: pip install -e .[tf]):\n"
      f"  tfds build {name} --data_dir={where} --file_format=array_record\n"
      f"and point --config.data.tfds_data_dir at {where}.")
  if name.startswith("imagenet2012"):
    steps = (
        f"ImageNet must be downloaded by hand: put ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar in {where}/downloads/manual, then " + steps)
  return steps[0].upper() + steps[1:]


class TfdsSource:
  """A split of a prepared tfds dataset (see the module docstring)."""

  def __init__(self, name: str, split: str, image_size: int, *,
               data_dir: str = "", on_bad_image: str = "error"):
    """Opens the split; never downloads or prepares anything.

    Args:
      name: tfds dataset name, e.g. 'imagenet2012' (optionally 'name:version').
      split: tfds split name, e.g. 'train' or 'validation'.
      image_size: the output side S.
      data_dir: tfds data dir; '' = tfds's default.
      on_bad_image: 'error' or 'skip'.

    Raises:
      DataError: unknown, unprepared or non-array_record dataset, unknown split,
        or no 'image' feature.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.image_size = int(image_size)
    self.name = name
    if storage.is_remote(data_dir):
      logging.info("copying tfds %s from %s to local disk (once)", name, data_dir)
      data_dir = os.path.dirname(storage.local_copy(storage.join(data_dir, name.split(":")[0])))
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f"tfds dataset {name!r} is unknown or cannot be opened "
          f"(data_dir={data_dir or 'default'}): {type(e).__name__}: "
          f"{str(e).splitlines()[0][:300] if str(e) else ''}\nCheck --config.data.tfds_name. "
          + _prepare_help(name, data_dir)) from e
    if not builder.is_prepared():
      raise DataError(
          f"tfds dataset {name!r} is not prepared in "
          f"{data_dir or 'the default data dir'} (looked in {builder.data_dir}). "
          + _prepare_help(name, data_dir))
    info = builder.info
    file_format = getattr(info.file_format, "value", info.file_format)
    if str(file_format) != "array_record":
      raise DataError(
          f"tfds dataset {name!r} in {builder.data_dir} is stored as "
          f"{file_format}, which cannot be read without TensorFlow. Rebuild it "
          f"with --file_format=array_record. " + _prepare_help(name, data_dir))
    splits = list(info.splits.keys())
    if split not in splits:
      if split == "val" and "validation" in splits:
        logging.info("tfds %s has no 'val' split; using 'validation'.", name)
        split = "validation"
      else:
        raise DataError(
            f"tfds dataset {name!r} has no split {split!r}; it has {splits}. "
            f"Set --config.data.train_split / --config.data.val_split.")
    features = info.features
    if "image" not in features:
      raise DataError(f"tfds dataset {name!r} has no 'image' feature "
                      f"(features: {list(features.keys())}).")
    self._has_label = "label" in features
    names = getattr(features["label"], "names", None) if self._has_label else None
    self.class_names = list(names) if names else []
    self.num_classes = len(self.class_names)
    if self._has_label and not self.num_classes:
      logging.warning("tfds %s: 'label' has no class names; num_classes=0.", name)
    self.split = split
    # Raw encoded bytes: PIL decodes them (faster JPEG `draft`, same path as
    # folders, and a damaged image surfaces as an exception we can skip).
    self._ds = builder.as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})
    self._len = len(self._ds)
    if self._len == 0:
      raise DataError(f"tfds dataset {name!r} split {split!r} is empty.")
    self._policy = BadImagePolicy(on_bad_image, self._len)

  @property
  def num_skipped(self) -> int:
    """Distinct unreadable records skipped so far."""
    return self._policy.num_skipped

  def __len__(self) -> int:
    return self._len

  def _decode(self, i: int) -> tuple[np.ndarray, int]:
    record: dict[str, Any] = self._ds[i]
    image = decode_image(record["image"], self.image_size)
    label = int(record["label"]) if self._has_label else 0
    return image, label

  def get(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
    """Returns (uint8 [S, S, 3] image, int label) of record `index`.

    `epoch` is unused: records are the same every epoch.
    """
    image, label, _ = self.read(index, epoch)
    return image, label

  def read(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int, np.ndarray]:
    """`get` plus the skip record of `errors.BadImagePolicy.read_counted`."""
    del epoch
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range [0, {self._len})")
    (image, label), skipped = self._policy.read_counted(
        index, self._decode, lambda i: f"{self.name}[{self.split}] record {i}")
    return image, label, skipped
