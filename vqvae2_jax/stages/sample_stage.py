"""Generate images: ancestral sampling over all levels, then rejection sampling.

Writes under <workdir>/sample/:
  samples.png            every generated image, one row per class (class names shown)
  samples.npz            codes per level, labels, uint8 images, classifier scores
  images/00000.png ...   the individual images
  rejection.png          with a classifier: the accepted samples per class, best first
  rejection.json         the acceptance rate and the settings
With rejection sampling, ceil(num_images / keep_fraction) candidates cycle through the
intended classes, and each class keeps exactly its intended count of best-scoring ones
(`sampling.rejection.accept`), so num_images are accepted whatever the fraction.
Rejection is asked for by a classifier with keep_fraction < 1 or a threshold > 0; without
it (keep_fraction 1, threshold 0) no classifier is loaded. The classifier is loaded
before drawing (a missing one fails before the work), and samples.npz is written as soon
as the images are drawn (scores NaN), then again with the scores: a failure after the
draw loses none of it.
On many processes each process draws and scores its devices' rows of every batch (the
images do not depend on the split) and process 0 writes the files.
"""
from __future__ import annotations

import json
import math

import jax
import numpy as np

from vqvae2_jax import api
from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax import storage
from vqvae2_jax.registry import REJECT_NONE, SAMPLE
from vqvae2_jax.sampling import rejection

NAME = SAMPLE
SAMPLES_NPZ = "samples.npz"


def class_grid(path: str, images: np.ndarray, labels: np.ndarray, class_names, cols: int,
               order: np.ndarray | None = None) -> str:
  """A grid with one row per class (in label order), labelled with the class name."""
  order = np.arange(len(images)) if order is None else order
  rows, names = [], []
  for c in np.unique(labels):
    members = [i for i in order if labels[i] == c][:cols]
    row = np.zeros((cols,) + images.shape[1:], np.uint8) + 255
    row[:len(members)] = images[members]
    rows.append(row)
    names.append(class_names[c] if c < len(class_names) else str(c))
  return image_lib.save_grid(path, np.concatenate(rows), cols=cols,
                             row_labels=[n[:14] for n in names])


def rejection_requested(rejection_config) -> bool:
  """Whether config.sample.rejection asks for rejection: a classifier, and fewer images
  kept than drawn (keep_fraction < 1) or a minimum score (threshold > 0)."""
  r = rejection_config
  return r.classifier != REJECT_NONE and (r.keep_fraction < 1 or r.threshold > 0)


def write_samples(out_dir: str, result: dict, scores: np.ndarray) -> str:
  """Process 0 writes samples.npz: the sampler's arrays (codes per level [N, h_l, w_l],
  label [N], image uint8 [N, S, S, 3]) and the classifier scores float32 [N]."""
  path = storage.join(out_dir, SAMPLES_NPZ)
  if jax.process_index() == 0:
    storage.makedirs(out_dir)
    with storage.open(path, "wb") as f:
      np.savez_compressed(f, scores=scores, **{k: v for k, v in result.items()})
  return path


def run(config, workdir: str) -> None:
  """Generates config.sample.num_images images and writes them under <workdir>/sample."""
  s, r = config.sample, config.sample.rejection
  run = api.load(workdir, config=config)
  w = run.workdir
  out_dir = w.stage_dir(NAME)
  w.write_config(NAME, config)
  sampler = run.sampler()
  use_rejection = rejection_requested(r) and sampler.num_classes > 0
  # Loaded before drawing: a missing classifier (or its weights) fails before the work.
  score_fn = run.scorer(r.classifier) if use_rejection else None
  intended = run.sample_labels(s.num_images, s.labels, sampler.num_classes)
  labels = intended
  if use_rejection:
    # About 1 / keep_fraction candidates per intended image, cycling the same classes.
    labels = np.resize(intended, rejection.num_candidates(s.num_images, r.keep_fraction))
  n = s.num_images if labels is None else len(labels)
  parallel.print0(f"[{NAME}] {n} images, levels {sampler.levels}, sampler={s.sampler}, "
                  f"temperature={s.temperature}")
  result = sampler.generate(n, labels, s.seed)
  images, labels = result["image"], result["label"]
  scores = np.full(len(images), np.nan, np.float32)
  samples_path = write_samples(out_dir, result, scores)
  parallel.print0(f"[{NAME}] wrote {samples_path}")
  names = run.class_names or [str(i) for i in range(max(sampler.num_classes, 1))]
  per_class = max(len(np.unique(labels)), 1)
  cols = max(1, min(8, math.ceil(len(images) / per_class)))
  if jax.process_index() == 0:
    storage.makedirs(storage.join(out_dir, "images"))
    for i, img in enumerate(images):
      image_lib.save_grid(storage.join(out_dir, "images", f"{i:05d}.png"), img[None], 1,
                          pad=0)
    grid = class_grid(storage.join(out_dir, "samples.png"), images, labels, names, cols)
    parallel.print0(f"[{NAME}] wrote {grid}")
  if not use_rejection:
    return
  class_map = rejection.class_map_for(r.classifier, r.class_map)
  scores = rejection.intended_class_scores(score_fn(images), labels, class_map)
  write_samples(out_dir, result, scores)
  accepted = rejection.accept(scores, labels, intended, threshold=r.threshold)
  summary = {"classifier": r.classifier, "keep_fraction": r.keep_fraction,
             "threshold": r.threshold, "requested": int(s.num_images),
             "candidates": int(len(images)), "accepted": int(accepted.sum()),
             "acceptance_rate": float(accepted.mean()),
             "mean_score_all": float(scores.mean()),
             "mean_score_accepted": float(scores[accepted].mean()) if accepted.any() else 0.0}
  if jax.process_index() == 0:
    order = np.argsort(-scores, kind="stable")
    order = order[accepted[order]]
    path = class_grid(storage.join(out_dir, "rejection.png"), images, labels, names,
                      cols=max(1, min(8, math.ceil(s.num_images / per_class))), order=order)
    storage.write_text(storage.join(out_dir, "rejection.json"), json.dumps(summary, indent=2))
    parallel.print0(f"[{NAME}] rejection sampling with the {r.classifier} classifier: "
                    f"accepted {summary['accepted']}/{summary['candidates']} "
                    f"({100 * summary['acceptance_rate']:.0f}%), mean p(class) "
                    f"{summary['mean_score_all']:.3f} -> "
                    f"{summary['mean_score_accepted']:.3f}; wrote {path}")
