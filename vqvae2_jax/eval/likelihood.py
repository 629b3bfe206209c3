"""Prior negative log-likelihood of code maps (paper Table 1 NLL rows, section 3.2).

NLL is the mean per latent, in nats and bits: the code length of the lossy latents under
the prior, not a pixel likelihood. Works on built prior modules and parameters.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from vqvae2_jax import parallel
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data.sources import spread_indices


def prior_inputs(batch: dict, level: str, upper: tuple[str, ...], conditional: bool):
  """(codes [B,H,W], cond_codes tuple (top first), labels [B] or None) of a code batch."""
  return (batch[level], tuple(batch[u] for u in upper),
          batch["label"] if conditional else None)


def nll_terms(logits: jax.Array, codes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example mean NLL (nats per latent) and accuracy: float32 [B] each.

  logits float [B, H, W, K]; codes int [B, H, W]. The log-softmax runs in float32.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)
  correct = (jnp.argmax(logits, -1) == codes).astype(jnp.float32)
  return ce.mean(axis=(1, 2)), correct.mean(axis=(1, 2))


def make_nll_fn(prior, level: str, upper: tuple[str, ...]
                ) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
  """Jitted (params, code batch) -> per-example NLL and accuracy, float32 [B] each."""
  conditional = prior.num_classes > 0

  @functools.partial(jax.jit, out_shardings=parallel.batch_sharding())
  def nll(params, batch):
    codes, cond, labels = prior_inputs(batch, level, upper, conditional)
    logits = prior.apply({"params": params}, codes, cond, labels, train=False)
    return nll_terms(logits, codes)
  return nll


def dataset_nll(nll_fn, params: Any, codes: codes_lib.CodeShards, batch_size: int,
                max_batches: int = 0) -> dict[str, float]:
  """Mean NLL per latent (nats, bits) and accuracy over a split (max_batches 0 = all)."""
  total_nll = total_acc = count = 0.0
  rows = spread_indices(len(codes), max_batches * batch_size)
  for batch in codes_lib.iterate_codes_once(codes, batch_size, indices=rows):
    arrays = parallel.host_to_global(batch)
    nll, acc = nll_fn(params, arrays)
    valid = arrays["valid"]
    total_nll += float(jnp.sum(jnp.where(valid, nll, 0.0)))
    total_acc += float(jnp.sum(jnp.where(valid, acc, 0.0)))
    count += float(jnp.sum(valid))
  count = max(count, 1.0)
  return {"nll_nats": total_nll / count, "nll_bits": total_nll / count / math.log(2),
          "accuracy": total_acc / count, "num_examples": int(count)}
