"""Training and testing the project's classifier (rejection sampling, CAS).

The classifier stage trains it on the experiment's labelled images; the CAS evaluator
trains the same architecture on generated samples. Both build the TrainTask here from a
built `ResNetClassifier` and image sources.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax.data.loader import BatchLoader, iterate_once
from vqvae2_jax.data.sources import spread_subset
from vqvae2_jax.eval.classifier import ResNetClassifier, classifier_init_fn
from vqvae2_jax.train import loop


def make_loss_fn(model: ResNetClassifier):
  """(params, model_state, batch, rng) -> (cross-entropy, (metrics, model_state))."""
  def loss_fn(params, model_state, batch, rng):
    logits = model.apply({"params": params}, image_lib.to_model(batch["image"]), train=True,
                         rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, ({"accuracy": accuracy}, model_state)
  return loss_fn


def make_logits_fn(model: ResNetClassifier):
  """Jitted (params, uint8 images [B, S, S, 3]) -> float32 logits [B, C]."""
  @functools.partial(jax.jit, out_shardings=parallel.batch_sharding())
  def logits_fn(params, images):
    return model.apply({"params": params}, image_lib.to_model(images), train=False)
  return logits_fn


def accuracy_on(logits_fn, params, source, batch_size: int,
                max_batches: int = 0) -> dict[str, float]:
  """Top-1 / top-5 accuracy over an image source (max_batches 0 = all of it)."""
  top1 = top5 = count = 0.0
  for batch in iterate_once(spread_subset(source, max_batches * batch_size), batch_size):
    arrays = parallel.host_to_global(
        {"image": batch["image"], "label": batch["label"], "valid": batch["valid"]})
    logits = logits_fn(params, arrays["image"])
    labels = arrays["label"]
    k = min(5, logits.shape[-1])
    ranked = jnp.argsort(-logits, axis=-1)[:, :k]
    valid = arrays["valid"]
    top1 += float(jnp.sum((ranked[:, 0] == labels) & valid))
    top5 += float(jnp.sum(jnp.any(ranked == labels[:, None], axis=-1) & valid))
    count += float(jnp.sum(valid))
  count = max(count, 1.0)
  return {"top1": top1 / count, "top5": top5 / count, "num_images": int(count)}


def classifier_task(model: ResNetClassifier, train_source, val_source, train_config, *,
                    name: str, image_size: int, seed: int,
                    num_threads: int = 4, worker_count: int = 0) -> loop.TrainTask:
  """A TrainTask for `model` on `train_source`, validated on `val_source` (or None).

  num_threads / worker_count: decode threads per process and decode worker processes
  (0 = in-process; keep 0 for in-memory sources such as generated samples).
  """
  if train_source.num_classes < 2:
    raise ValueError(f"the {name} classifier needs labelled data with >= 2 classes; this "
                     f"data has {train_source.num_classes}")
  t = train_config
  logits_fn = make_logits_fn(model)
  loader = BatchLoader(train_source, t.batch_size, seed=seed, num_threads=num_threads,
                       worker_count=worker_count)

  def evaluate(state):
    return accuracy_on(logits_fn, state.params, val_source, t.batch_size,
                       t.eval_batches)

  return loop.TrainTask(
      name=name, init_variables=classifier_init_fn(model, image_size),
      loss_fn=make_loss_fn(model), loader=loader,
      evaluate=evaluate if val_source is not None else None,
      progress_keys=("loss", "accuracy"))
