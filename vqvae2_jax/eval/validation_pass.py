"""One pass over real validation images, shared by the evaluators that need originals
and their VQ-VAE reconstructions (feature statistics, CAS on reconstructions).

Each image is reconstructed once; every consumer sees the valid rows of each global
batch. On many processes each process reads its slice of the batch, the reconstructions
are computed on every device, and every process's consumers see the whole batch (the
consumers split their own work over the processes again, `parallel.shared_to_global`).
"""
from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

import numpy as np

from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax.data.loader import iterate_once
from vqvae2_jax.eval.reconstruction import ReconstructFn


class ImageConsumer(Protocol):
  """What a pass feeds: `update(originals, reconstructions, labels)` per batch."""

  def update(self, originals: np.ndarray, reconstructions: np.ndarray,
             labels: np.ndarray) -> None:
    """uint8 [n, S, S, 3] twice and int [n], the batch's valid rows."""


def validation_pass(source, reconstruct: ReconstructFn, variables: Any,
                    consumers: Sequence[ImageConsumer], batch_size: int,
                    log=print) -> int:
  """Feeds every image of `source` and its reconstruction to each consumer.

  Args:
    source: an ImageSource (labels 0 when unlabelled).
    reconstruct, variables: `reconstruction.make_reconstruct_fn` and stage-1 variables.
    consumers: ImageConsumers, updated in order.
    batch_size: images per device call (a multiple of the mesh size).

  Returns:
    The number of images passed.
  """
  n, done, start = len(source), 0, time.time()
  for batch in iterate_once(source, batch_size):
    arrays = parallel.host_to_global(
        {k: batch[k] for k in ("image", "label", "valid")})
    rec = image_lib.to_uint8(parallel.global_to_host(reconstruct(variables, arrays["image"])))
    whole = {k: parallel.global_to_host(v) for k, v in arrays.items()}
    valid = whole["valid"]
    for consumer in consumers:
      consumer.update(whole["image"][valid], rec[valid], whole["label"][valid])
    done += int(valid.sum())
    log(f"validation images {done}/{n} ({done / (time.time() - start):.1f} img/s)")
  return done
