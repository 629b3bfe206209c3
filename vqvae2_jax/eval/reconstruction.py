"""Reconstruction error of stage 1 (paper Table 1, "VQ decoder" MSE rows).

MSE is per pixel and channel on the [-1, 1] scale the models use; `mse_01` = mse / 4 is
the [0, 1] scale the paper's figures imply. Works on built modules and variables.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax.data.loader import iterate_once
from vqvae2_jax.data.sources import spread_subset

# (variables, uint8 images [B, S, S, 3] global) -> float32 [B, S, S, 3] in [-1, 1]
ReconstructFn = Callable[[Any, jax.Array], jax.Array]


def make_reconstruct_fn(model) -> ReconstructFn:
  """Jitted (variables, uint8 images [B, S, S, 3]) -> float32 reconstructions."""
  @functools.partial(jax.jit, out_shardings=parallel.batch_sharding())
  def reconstruct(variables, images):
    return model.apply(variables, image_lib.to_model(images), method=model.reconstruct)
  return reconstruct


def reconstruction_mse(reconstruct: ReconstructFn, variables: Any, source, batch_size: int,
                       max_batches: int = 0) -> dict[str, float]:
  """Mean MSE over up to max_batches batches of an image source (0 = all of it).

  Returns {'mse', 'mse_01', 'psnr', 'num_images'}; padded rows are excluded.
  """
  total, count = 0.0, 0
  for batch in iterate_once(spread_subset(source, max_batches * batch_size), batch_size):
    arrays = parallel.host_to_global({"image": batch["image"], "valid": batch["valid"]})
    recon = reconstruct(variables, arrays["image"])
    err = jnp.mean((recon - image_lib.to_model(arrays["image"]))**2, axis=(1, 2, 3))
    total += float(jnp.sum(jnp.where(arrays["valid"], err, 0.0)))
    count += int(jnp.sum(arrays["valid"]))
  mse = total / max(count, 1)
  return {"mse": mse, "mse_01": mse / 4, "psnr": float(image_lib.psnr_from_mse(mse)),
          "num_images": count}
