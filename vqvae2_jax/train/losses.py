"""The training losses of stage 1 and of the priors, shared by their stages, the TPU
compile check (`vqvae2_jax.compile`) and the benchmarks, so all run the same program."""
from __future__ import annotations

import math

import jax.numpy as jnp

from vqvae2_jax import images as image_lib
from vqvae2_jax.eval import likelihood
from vqvae2_jax.models.quantizer import VQ_BATCH_COLLECTION, VQ_COLLECTION


def vqvae_loss_fn(model, beta: float, deferred_codebooks: bool = False):
  """(params, model_state, batch, rng) -> (loss, (metrics, new_model_state)).

  Loss: MSE(x, D(e)) + beta * commitment on images in [-1, 1] (batch["image"] uint8
  [B, S, S, 3]). deferred_codebooks: the quantizers only write the batch's code statistics
  ('vq_batch') and `vqvae.finalize_codebooks` applies one EMA step over all microbatches
  (gradient accumulation); otherwise each step's EMA update happens inside the loss
  ('vq_stats').
  """
  collection = VQ_BATCH_COLLECTION if deferred_codebooks else VQ_COLLECTION

  def loss_fn(params, model_state, batch, rng):
    x = image_lib.to_model(batch["image"])
    out, updates = model.apply({"params": params, **model_state}, x, train=True,
                               mutable=[collection], rngs={"reseed": rng})
    mse = jnp.mean((out.reconstruction - x)**2)
    loss = mse + beta * out.commitment_loss
    metrics = dict(mse=mse, psnr=image_lib.psnr_from_mse(mse),
                   commitment=out.commitment_loss, perplexity=out.perplexity,
                   code_usage=out.usage)
    return loss, (metrics, {**model_state, **updates})
  return loss_fn


def prior_loss_fn(prior, level: str, upper: tuple[str, ...]):
  """(params, model_state, code batch, rng) -> (mean NLL, (metrics, model_state)).

  The batch holds int32 codes [B, H, W] per level name (this one and the `upper` ones)
  and, for a class-conditional prior, int32 labels [B] under "label".
  """
  conditional = prior.num_classes > 0

  def loss_fn(params, model_state, batch, rng):
    codes, cond, labels = likelihood.prior_inputs(batch, level, upper, conditional)
    logits = prior.apply({"params": params}, codes, cond, labels, train=True,
                         rngs={"dropout": rng})
    nll, acc = likelihood.nll_terms(logits, codes)
    loss = nll.mean()
    return loss, (dict(nll_nats=loss, nll_bits=loss / math.log(2), accuracy=acc.mean()),
                  model_state)
  return loss_fn
