"""Classification Accuracy Score (Ravuri & Vinyals 2019; paper section 5.3, Table 2).

A classifier of the experiment's `classifier` architecture is trained only on generated
samples (with the labels they were generated for) and tested on real validation images;
beside it, the same classifier trained on real data. Testing on VQ-VAE reconstructions of
the validation images gives the paper's "after reconstructing" row.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from vqvae2_jax.stages import classifier_stage
from vqvae2_jax.train import loop


class ArraySource:
  """An ImageSource over images held in an array (in memory or memory-mapped).

  Serves generated samples to the classifier's BatchLoader without writing image files.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
               rows: np.ndarray | None = None):
    """Args:
      images: uint8 [N, S, S, 3] (an np.memmap stays on disk).
      labels: int [N], the class each image was generated for.
      class_names: names of all classes (num_classes = len(class_names)).
      rows: int [n], the rows of `images` this source exposes (default: all).
    """
    self.images, self.labels = images, np.asarray(labels, np.int32)
    self.rows = np.arange(len(images)) if rows is None else np.asarray(rows, np.int64)
    self.class_names = list(class_names)
    self.num_classes = len(self.class_names)
    self.num_skipped = 0

  def __len__(self) -> int:
    return len(self.rows)

  def get(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
    """(uint8 [S, S, 3], label) of item `index`; `epoch` is unused (no augmentation)."""
    del epoch
    row = int(self.rows[index])
    return np.asarray(self.images[row]), int(self.labels[row])


class TopKCounter:
  """Accumulates top-1 / top-5 accuracy over batches of logits."""

  def __init__(self):
    self.top1 = self.top5 = self.count = 0

  def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
    """logits float [B, C]; labels int [B] (only valid rows are passed)."""
    logits = np.asarray(logits)
    k = min(5, logits.shape[-1])
    ranked = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    labels = np.asarray(labels)
    self.top1 += int(np.sum(ranked[:, 0] == labels))
    self.top5 += int(np.sum(np.any(ranked == labels[:, None], axis=-1)))
    self.count += len(labels)

  def result(self) -> dict[str, float]:
    """{'top1', 'top5'} accuracies (fractions) and 'num_images' counted so far."""
    n = max(self.count, 1)
    return {"top1": self.top1 / n, "top5": self.top5 / n, "num_images": self.count}


def train_classifier(config, mesh, workdir: str, name: str, train_source=None):
  """Trains (or resumes) the experiment's classifier into `<workdir>/<name>`.

  Uses config.classifier (architecture and train fields: the same steps as the
  `classifier` stage). train_source None means the experiment's train split.

  Returns:
    (model, params) of the trained classifier.
  """
  task = classifier_stage.build_task(config, mesh, train_source=train_source, name=name)
  state = loop.train(task, config.classifier.train, workdir=workdir, mesh=mesh,
                     axis_rules=config.axis_rules, seed=config.seed)
  num_classes = (train_source.num_classes if train_source is not None
                 else task.loader.source.num_classes)
  return classifier_stage.build_classifier(config, num_classes), state.params


def has_checkpoint(workdir: str, name: str) -> bool:
  """Whether `<workdir>/<name>/checkpoints` holds at least one saved step."""
  directory = os.path.join(workdir, name, "checkpoints")
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def real_data_classifier(config, mesh, workdir: str, num_classes: int,
                         fallback_name: str) -> tuple[object, object, str]:
  """The classifier trained on real data: the `classifier` stage's checkpoint if present,
  else one trained now into `<workdir>/<fallback_name>` with the same settings.

  Returns:
    (model, params, where) with `where` naming the checkpoint directory used.
  """
  if has_checkpoint(workdir, classifier_stage.NAME):
    model, params = classifier_stage.load_classifier(config, workdir, num_classes, mesh)
    return model, params, classifier_stage.NAME
  print(f"[evaluate] no '{classifier_stage.NAME}' checkpoint: training the real-data "
        f"classifier into {fallback_name}", flush=True)
  model, params = train_classifier(config, mesh, workdir, fallback_name)
  return model, params, fallback_name
