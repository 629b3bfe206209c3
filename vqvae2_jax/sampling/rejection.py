"""Classifier-based rejection sampling (paper section 3.3).

Each generated image is scored by a classifier's probability of the class it was
generated for; a sample is accepted when the score reaches `threshold` and lies in the
top `keep_fraction` of its class. Lower acceptance trades diversity for quality
(paper Figure 7).
"""
from __future__ import annotations

import numpy as np


def intended_class_scores(probs: np.ndarray, labels: np.ndarray,
                          class_map: np.ndarray | None = None) -> np.ndarray:
  """p(intended class | image): probs float [N, C], labels int [N] -> float [N].

  class_map maps the data set's labels to the classifier's classes (e.g. Imagenette
  label -> ImageNet-1k index); identity when None.
  """
  target = labels if class_map is None else np.asarray(class_map)[labels]
  return probs[np.arange(len(labels)), target]


def accept(scores: np.ndarray, labels: np.ndarray, *, keep_fraction: float = 1.0,
           threshold: float = 0.0) -> np.ndarray:
  """bool [N]: above `threshold` and within the top ceil(keep_fraction * n_c) of class c."""
  if not 0 < keep_fraction <= 1:
    raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]")
  keep = scores >= threshold
  for c in np.unique(labels):
    members = np.nonzero(labels == c)[0]
    quota = int(np.ceil(keep_fraction * len(members)))
    ranked = members[np.argsort(-scores[members], kind="stable")]
    keep[ranked[quota:]] = False
  return keep
