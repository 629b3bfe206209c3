"""Paper Table 1: NLL of each prior on the extracted codes and MSE of the VQ-VAE.

Both on the train and validation splits. NLL is the mean per latent (nats and bits) of
`likelihood.dataset_nll`; MSE is `reconstruction.reconstruction_mse`. Works on built
modules and parameters; the caller picks which params serve (EMA when kept).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

from vqvae2_jax import registry
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data.sources import spread_subset
from vqvae2_jax.eval import likelihood
from vqvae2_jax.eval import reconstruction
from vqvae2_jax.eval.options import EvalOptions


class LevelPrior(NamedTuple):
  """A built prior to score: module, params, the level names above it (top first) and
  which params these are ('ema' or 'raw', shown in the table)."""
  module: Any
  params: Any
  upper: tuple[str, ...]
  params_kind: str


def vqvae_mse(vqvae, variables, sources: Mapping[str, Any], opts: EvalOptions,
              log=print) -> dict[str, dict[str, float]]:
  """split -> {'mse', 'mse_01', 'psnr', 'num_images'} on up to opts.mse_max_images
  images of each source (spread evenly over it)."""
  reconstruct = reconstruction.make_reconstruct_fn(vqvae)
  out = {}
  for split, source in sources.items():
    subset = spread_subset(source, opts.mse_max_images)
    log(f"VQ-VAE MSE on {len(subset)} {split} images")
    out[split] = reconstruction.reconstruction_mse(
        reconstruct, variables, subset, opts.batch_size,
        math.ceil(len(subset) / opts.batch_size))
  return out


def prior_nll(level: str, prior: LevelPrior, shards: Mapping[str, codes_lib.CodeShards],
              opts: EvalOptions, log=print) -> dict[str, Any]:
  """{'params': 'ema'|'raw', <split>: {'nll_nats', 'nll_bits', 'accuracy', 'num_examples'}}
  of one level's prior on up to opts.nll_max_batches batches of each split's codes."""
  nll_fn = likelihood.make_nll_fn(prior.module, level, prior.upper)
  row: dict[str, Any] = {"params": prior.params_kind}
  for split, codes in shards.items():
    log(f"{registry.prior_stage(level)} NLL on the {split} codes")
    row[split] = likelihood.dataset_nll(nll_fn, prior.params, codes, opts.batch_size,
                                        opts.nll_max_batches)
  return row


def table1(vqvae, variables, image_sources: Mapping[str, Any],
           priors: Mapping[str, LevelPrior], shards: Mapping[str, codes_lib.CodeShards],
           opts: EvalOptions, log=print) -> dict[str, dict]:
  """{'vqvae': split -> MSE row, 'priors': level -> NLL row} (see `vqvae_mse`,
  `prior_nll`); `priors` may be empty (no codes or no trained prior)."""
  mse = vqvae_mse(vqvae, variables, image_sources, opts, log)
  return {"priors": {level: prior_nll(level, p, shards, opts, log)
                     for level, p in priors.items()}, "vqvae": mse}
