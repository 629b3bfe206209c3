"""Classification Accuracy Score (Ravuri & Vinyals 2019; paper section 5.3, Table 2).

A classifier of the experiment's `classifier` architecture is trained only on generated
samples (with the labels they were generated for) and tested on real validation images;
beside it, the same classifier trained on real data. Testing on VQ-VAE reconstructions of
the validation images gives the paper's "after reconstructing" row. Works on built
modules; the caller says where the trained classifier's checkpoints live.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from vqvae2_jax.eval import classifier_training
from vqvae2_jax.eval.classifier import ResNetClassifier
from vqvae2_jax.sampling import scorers
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


class ClassifierAccuracy:
  """A `validation_pass` consumer: top-1 / top-5 of each classifier on the real images
  and on their reconstructions."""

  def __init__(self, classifiers: Mapping[str, tuple[ResNetClassifier, Any]],
               batch_size: int):
    """classifiers: name -> (model, params); batch_size a multiple of the mesh size."""
    self.batch_size = batch_size
    self.fns = {name: (classifier_training.make_logits_fn(model), params)
                for name, (model, params) in classifiers.items()}
    self.counters = {(name, kind): TopKCounter() for name in classifiers
                     for kind in ("real", "recon")}

  def update(self, originals: np.ndarray, reconstructions: np.ndarray,
             labels: np.ndarray) -> None:
    """uint8 [n, S, S, 3] twice and their int [n] labels."""
    for name, (fn, params) in self.fns.items():
      for kind, images in (("real", originals), ("recon", reconstructions)):
        logits = scorers.batched(lambda x, fn=fn, params=params: fn(params, x), images,
                                 self.batch_size)
        self.counters[name, kind].update(logits, labels)

  def result(self) -> dict[str, dict[str, float]]:
    """'<name>_on_real' / '<name>_on_recon' -> {'top1', 'top5', 'num_images'}."""
    return {f"{name}_on_{kind}": c.result() for (name, kind), c in self.counters.items()}


def train_classifier(model: ResNetClassifier, train_source, val_source, train_config, *,
                     name: str, directory: str, checkpoint_dir: str, image_size: int,
                     seed: int, data_seed: int, num_threads: int = 4) -> Any:
  """Trains (or resumes, or just restores when finished) `model` on `train_source`.

  Args:
    model: a built ResNetClassifier with train_source.num_classes outputs.
    train_source / val_source: ImageSources (val None: no validation during training).
    train_config: the classifier's train section (the classifier stage's steps).
    directory / checkpoint_dir: where metrics and checkpoints go (from the caller's
      Workdir); a finished run there is restored, not retrained.
    seed / data_seed: initialisation and data-order seeds.

  Returns:
    The parameters that serve inference (the parameter EMA when kept).
  """
  task = classifier_training.classifier_task(
      model, train_source, val_source, train_config, name=name, image_size=image_size,
      seed=data_seed, num_threads=num_threads)
  state = loop.train(task, train_config, directory=directory, checkpoint_dir=checkpoint_dir,
                     seed=seed)
  return state.ema_params if train_config.param_ema_decay > 0 else state.params
