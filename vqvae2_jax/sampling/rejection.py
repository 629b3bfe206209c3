"""Classifier-based rejection sampling (paper section 3.3).

Each generated image is scored by a classifier's probability of the class it was
generated for. With keep fraction f, every intended image of class c gets about 1 / f
candidates of its class, and class c keeps exactly its intended count q_c of best-scoring
candidates (those below `threshold` are never kept). Lower f trades diversity for
quality (paper Figure 7). `sample` and `evaluate` select by this one rule.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from vqvae2_jax.registry import EFFICIENTNET_LITE0


def intended_class_scores(probs: np.ndarray, labels: np.ndarray,
                          class_map: np.ndarray | None = None) -> np.ndarray:
  """p(intended class | image): probs float [N, C], labels int [N] -> float [N].

  class_map maps the data set's labels to the classifier's classes (e.g. Imagenette
  label -> ImageNet-1k index); identity when None (see `class_map_for`).
  """
  labels = np.asarray(labels)
  target = labels if class_map is None else np.asarray(class_map)[labels]
  if len(target) and target.max() >= probs.shape[1]:
    raise ValueError(f"class {int(target.max())} is out of range for a classifier with "
                     f"{probs.shape[1]} classes: sample.rejection.class_map maps labels to "
                     f"the ImageNet-1k classes of {EFFICIENTNET_LITE0} only")
  return probs[np.arange(len(labels)), target]


def class_map_for(classifier: str, class_map) -> np.ndarray | None:
  """The label -> classifier-class map a rejection classifier uses: the config's
  sample.rejection.class_map for 'efficientnet_lite0' (ImageNet-1k classes; None, i.e.
  labels taken as ImageNet indices, when empty) and None (identity) for the experiment's
  own classifier ('trained'), whose classes are the data's."""
  if classifier == EFFICIENTNET_LITE0 and class_map:
    return np.asarray(class_map, np.int64)
  return None


def num_candidates(num: int, keep_fraction: float) -> int:
  """Candidates drawn for `num` accepted images at keep fraction f: ceil(num / f)."""
  if not 0 < keep_fraction <= 1:
    raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]")
  return math.ceil(num / keep_fraction - 1e-9)


def accept(scores: np.ndarray, labels: np.ndarray, intended: np.ndarray, *,
           threshold: float = 0.0) -> np.ndarray:
  """bool [N]: for each class c, its q_c best candidates scoring >= threshold.

  Args:
    scores: float [N], the intended-class score of each candidate.
    labels: int [N], the class each candidate was generated for.
    intended: int [n], the classes of the images wanted; q_c = count of c in it.
    threshold: minimum score to be kept.
  """
  keep = np.zeros(len(labels), bool)
  classes, counts = np.unique(np.asarray(intended), return_counts=True)
  for c, quota in zip(classes, counts):
    members = np.nonzero((labels == c) & (scores >= threshold))[0]
    keep[members[np.argsort(-scores[members], kind="stable")[:quota]]] = True
  return keep


def acceptance_masks(scores: np.ndarray | None, labels: np.ndarray, num: int,
                     fractions: Sequence[float]) -> dict[float, np.ndarray]:
  """keep fraction f -> bool [M]: the rejection-sampled set of keep fraction f.

  The first num candidates are the set drawn without rejection; keep fraction f selects
  among the first ceil(num / f) candidates by `accept`, so every fraction holds num images
  with the same class mix (FID depends on the set size). scores None: the first num.
  """
  masks = {}
  for f in fractions:
    m = np.zeros(len(labels), bool)
    if scores is None or f >= 1.0:
      m[:num] = True
    else:
      prefix = min(len(labels), num_candidates(num, f))
      m[:prefix] = accept(scores[:prefix], labels[:prefix], labels[:num])
    masks[f] = m
  return masks
