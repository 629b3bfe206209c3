"""Train an image classifier on the experiment's own labelled data.

Used for classifier-based rejection sampling on data sets whose classes are not ImageNet's
(paper section 3.3; `sample.rejection.classifier='trained'`) and as the real-data
baseline of the Classification Accuracy Score. Writes <workdir>/classifier/.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax.data.loader import BatchLoader, iterate_once
from vqvae2_jax.data.sources import make_source, spread_subset
from vqvae2_jax.eval.classifier import ResNetClassifier
from vqvae2_jax.train import loop

NAME = "classifier"


def build_classifier(config, num_classes: int) -> ResNetClassifier:
  """The ResNet classifier of config.classifier for `num_classes` labels."""
  c = config.classifier
  return ResNetClassifier(num_classes=num_classes, width=c.width,
                          stage_sizes=(c.depth,) * 3, dropout_rate=0.1,
                          input_pool=c.input_pool)


def classifier_init_fn(model, image_size: int):
  """rng -> the classifier's variables for [1, S, S, 3] images."""
  def init(rng):
    return model.init({"params": rng}, jnp.zeros((1, image_size, image_size, 3)),
                      train=False)
  return init


def make_loss_fn(model):
  """(params, model_state, batch, rng) -> (cross-entropy, (metrics, model_state))."""
  def loss_fn(params, model_state, batch, rng):
    logits = model.apply({"params": params}, image_lib.to_model(batch["image"]), train=True,
                         rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, ({"accuracy": accuracy}, model_state)
  return loss_fn


def make_logits_fn(model, mesh):
  """Jitted (params, uint8 images [B, S, S, 3]) -> float32 logits [B, C]."""
  @functools.partial(jax.jit, out_shardings=parallel.batch_sharding(mesh))
  def logits_fn(params, images):
    return model.apply({"params": params}, image_lib.to_model(images), train=False)
  return logits_fn


def accuracy_on(logits_fn, params, source, batch_size: int, mesh, max_batches: int = 0,
                class_map=None) -> dict[str, float]:
  """Top-1 / top-5 accuracy over a source (max_batches 0 = all of it)."""
  top1 = top5 = count = 0.0
  for batch in iterate_once(spread_subset(source, max_batches * batch_size), batch_size):
    arrays = parallel.host_to_global(
        {"image": batch["image"], "label": batch["label"], "valid": batch["valid"]}, mesh)
    logits = logits_fn(params, arrays["image"])
    labels = arrays["label"] if class_map is None else jnp.asarray(class_map)[arrays["label"]]
    k = min(5, logits.shape[-1])
    ranked = jnp.argsort(-logits, axis=-1)[:, :k]
    hit1 = ranked[:, 0] == labels
    hit5 = jnp.any(ranked == labels[:, None], axis=-1)
    valid = arrays["valid"]
    top1 += float(jnp.sum(hit1 & valid))
    top5 += float(jnp.sum(hit5 & valid))
    count += float(jnp.sum(valid))
  count = max(count, 1.0)
  return {"top1": top1 / count, "top5": top5 / count, "num_images": int(count)}


def build_task(config, mesh, train_source=None, name: str = NAME) -> loop.TrainTask:
  """A classifier TrainTask on `train_source` (default: the experiment's train split)."""
  t = config.classifier.train
  train_source = train_source or make_source(config.data, "train")
  if train_source.num_classes < 2:
    raise ValueError("the classifier stage needs labelled data with >= 2 classes; "
                     f"{config.data.source} data here has {train_source.num_classes}")
  val_source = make_source(config.data, "val")
  model = build_classifier(config, train_source.num_classes)
  logits_fn = make_logits_fn(model, mesh)
  loader = BatchLoader(train_source, t.batch_size, seed=config.data.seed,
                       num_threads=config.data.num_threads)

  def evaluate(state):
    return accuracy_on(logits_fn, state.params, val_source, t.batch_size, mesh, t.eval_batches)

  return loop.TrainTask(
      name=name, init_variables=classifier_init_fn(model, config.data.image_size),
      loss_fn=make_loss_fn(model), loader=loader, evaluate=evaluate,
      progress_keys=("loss", "accuracy"))


def load_classifier(config, workdir: str, num_classes: int, mesh, name: str = NAME):
  """(model, params) of a trained classifier checkpoint in `<workdir>/<name>`."""
  model = build_classifier(config, num_classes)
  state, _ = loop.restore_state(workdir, name,
                                classifier_init_fn(model, config.data.image_size),
                                config.classifier.train, mesh, config.axis_rules)
  return model, state.params


def run(config, workdir: str) -> None:
  """Trains the classifier stage into <workdir>/classifier."""
  from vqvae2_jax.stages import common  # pylint: disable=g-import-not-at-top
  mesh = common.setup_runtime(config)
  task = build_task(config, mesh)
  loop.train(task, config.classifier.train, workdir=workdir, mesh=mesh,
             axis_rules=config.axis_rules, seed=config.seed, config=config)
  parallel.print0(f"[{NAME}] done.")
