"""Train an image classifier on the experiment's own labelled data.

Used for classifier-based rejection sampling on data sets whose classes are not ImageNet's
(paper section 3.3; `sample.rejection.classifier='trained'`) and as the real-data
baseline of the Classification Accuracy Score. Writes <workdir>/classifier/
{config.json, classes.json, metrics.jsonl, checkpoints/}.
"""
from __future__ import annotations

from vqvae2_jax import builders
from vqvae2_jax import parallel
from vqvae2_jax.data.sources import make_source
from vqvae2_jax.eval.classifier_training import classifier_task
from vqvae2_jax.train import loop
from vqvae2_jax.registry import CLASSIFIER, TRAIN, VAL
from vqvae2_jax.workdir import Workdir

NAME = CLASSIFIER


def run(config, workdir: str) -> None:
  """Trains the classifier stage into <workdir>/classifier."""
  w = Workdir(workdir)
  train_source = make_source(config.data, TRAIN)
  model = builders.build_classifier(config, train_source.num_classes)
  task = classifier_task(model, train_source, make_source(config.data, VAL),
                         config.classifier.train, name=NAME,
                         image_size=config.data.image_size, seed=config.data.seed,
                         num_threads=config.data.num_threads,
                         worker_count=config.data.worker_count)
  w.write_config(NAME, config)
  w.write_classes(NAME, list(train_source.class_names))
  loop.train(task, config.classifier.train, directory=w.stage_dir(NAME),
             checkpoint_dir=w.checkpoint_dir(NAME), seed=config.seed)
  parallel.print0(f"[{NAME}] done.")
