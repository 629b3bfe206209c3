"""Class-probability scorers for rejection sampling and the trade-off evaluation.

A scorer maps uint8 images [N, H, W, 3] to float32 class probabilities [N, C]. `sample`
and `evaluate` use the same one, so a keep fraction selects the same images in both.
Built from already-loaded models (see `vqvae2_jax.api.Run.scorer`) inside
`parallel.use_mesh`; a scorer splits its batches over the mesh ambient when it was made,
so it can be called later without one:
  classifier_scorer: the project's classifier trained on the experiment's labels.
  network_scorer: a feature network with a classification head (EfficientNet-Lite0's
    ImageNet logits), whose classes are mapped from the data's labels by a class_map.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel

Scorer = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float32 [N, C] probs


def batched(fn: Callable[[jax.Array], jax.Array], images: np.ndarray, batch_size: int,
            sharding: NamedSharding | None = None) -> np.ndarray:
  """fn over fixed-size batches: images [N, ...] -> outputs [N, ...].

  Batches are placed with `sharding` (default: split over the ambient mesh,
  `parallel.batch_sharding()`).

  The last batch is padded with zeros and the padding dropped, so every call has one shape
  (one compilation) and padded rows never reach the result. On many processes every one
  passes the same `images` and gets every output back.
  """
  sharding = sharding if sharding is not None else parallel.batch_sharding()
  if batch_size % sharding.mesh.size:
    raise ValueError(f"scorer batch_size={batch_size} must be divisible by the "
                     f"{sharding.mesh.size} devices of the mesh")
  outs = []
  for lo in range(0, len(images), batch_size):
    chunk = np.asarray(images[lo:lo + batch_size])
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    # Every process holds the whole batch; each feeds (and scores) its devices' rows.
    x = parallel.shared_to_global(chunk, sharding)
    outs.append(parallel.global_to_host(fn(x))[:batch_size - pad])
  return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def classifier_scorer(model, params: Any, batch_size: int = 32) -> Scorer:
  """Softmax of a trained ResNetClassifier (uint8 images mapped to [-1, 1])."""
  fn = jax.jit(lambda x: jax.nn.softmax(model.apply(
      {"params": params}, image_lib.to_model(x), train=False), axis=-1))
  sharding = parallel.batch_sharding()
  return lambda images: batched(fn, images, batch_size, sharding)


def network_scorer(apply_fn, variables: Any, logits_key: str,
                   batch_size: int = 32) -> Scorer:
  """Softmax of a feature network's logits output (its apply takes uint8 images)."""
  fn = jax.jit(lambda x: jax.nn.softmax(apply_fn(variables, x)[logits_key], axis=-1))
  sharding = parallel.batch_sharding()
  return lambda images: batched(fn, images, batch_size, sharding)
