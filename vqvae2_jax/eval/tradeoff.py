"""The classifier-based rejection trade-off (paper section 3.3, Figure 7).

ceil(num / min(keep_fractions)) candidates are generated once (resumable, kept on disk)
and scored by the one rejection scorer `sample` uses (`sampling.scorers`); keep fraction
f takes the first ceil(num / f) candidates and keeps the best-scoring fraction f of each
class (`sampling.rejection.acceptance_masks`, the rule `sample` applies), so every
fraction is judged on num images with one class mix. The distances of each selection are
`distances.set_metrics`.

When the network that selects (the rejection scorer) is also the network whose features
judge the selection (EfficientNet-Lite0 standing in for missing Inception / VGG-16
weights), the curve measures the selector's own confidence: `self_judged` names the
metrics affected, and the report carries a warning.
"""
from __future__ import annotations

import json
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np

from vqvae2_jax import parallel
from vqvae2_jax import storage
from vqvae2_jax.eval import distances
from vqvae2_jax.eval.options import EvalOptions
from vqvae2_jax.sampling import rejection
from vqvae2_jax.sampling.hierarchical import HierarchicalSampler
from vqvae2_jax.sampling.scorers import Scorer

PROGRESS, IMAGES, LABELS = "progress.json", "images.npy", "labels.npy"


class Selector(NamedTuple):
  """The rejection scorer: its name in the report, images -> class probabilities, the
  data-label -> classifier-class map (None: identity), and the feature network it is
  (None for the experiment's own classifier)."""
  name: str
  score: Scorer
  class_map: np.ndarray | None
  network: str | None


class Candidates(NamedTuple):
  """images: uint8 [M, S, S, 3] (a read-only memmap; in memory for a bucket directory);
  labels: int32 [M] intended classes;
  seconds_per_image: wall-clock seconds the sampler spent per candidate with compilation
  excluded (None when none was timed, e.g. candidates of an older version)."""
  images: np.ndarray
  labels: np.ndarray
  seconds_per_image: float | None = None


def keep_fractions(opts: EvalOptions, with_scorer: bool) -> list[float]:
  """The fractions evaluated, descending, always with 1.0 (no rejection); only 1.0
  without a scorer."""
  return sorted(set(opts.keep_fractions) | {1.0}, reverse=True) if with_scorer else [1.0]


def candidate_labels(num: int, num_classes: int) -> np.ndarray:
  """int32 [num]: every class in turn (zeros for an unconditional model)."""
  if not num_classes:
    return np.zeros(num, np.int32)
  return np.resize(np.arange(num_classes, dtype=np.int32), num)


def generate_candidates(sampler: HierarchicalSampler, num: int, directory: str, *,
                        seed: int, image_size: int, model_steps: dict,
                        on_restart: Callable[[], None] | None = None,
                        log=print) -> Candidates:
  """Generates `num` candidates into `directory`, resuming what an earlier run wrote.

  The images go to images.npy (a memmap) in chunks of about 128; progress.json records
  how many are done and the key they were drawn with (num, seed, sampling options, image
  size and `model_steps`, e.g. the checkpoint steps). A different key starts over, after
  calling `on_restart` (for results derived from the old candidates). Chunk c uses seed
  seed * 1_000_003 + c.

  Sampling is timed: one warm-up batch (discarded) compiles the sampler outside the clock,
  and progress.json accumulates the seconds of the chunks and how many they drew, so the
  cost per candidate survives a resume.

  On many processes every process calls this alike: each draws its devices' rows of every
  batch (the draw does not depend on the split), process 0 alone reads and writes the
  files (it decides what is resumed), and all read them back once they are whole.
  """
  o = sampler.options
  key = dict(num=num, seed=seed, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
             sampler=o.sampler, image_size=image_size, **model_steps)
  if o.guidance != 1.0:  # (absent at 1: keys written before guidance stay valid)
    key["guidance"] = o.guidance
  progress_path = storage.join(directory, PROGRESS)
  labels = candidate_labels(num, sampler.num_classes)
  main = parallel.is_main_process()  # the one writer; the others draw their rows only
  if main:
    progress = _open_progress(directory, key, (num, image_size, image_size, 3), on_restart)
    storage.save_npy(storage.join(directory, LABELS), labels)
    images = _images(directory, (num, image_size, image_size, 3), "r+")
  done = int(parallel.main_process_value(np.int64(progress["done"] if main else 0)))
  chunk = o.batch_size * max(1, 128 // o.batch_size)
  if done < num:  # compile outside the clock (a seed no chunk uses)
    sampler.generate(o.batch_size, labels[:o.batch_size] if sampler.num_classes else None,
                     seed * 1_000_003 - 1, progress=False)
  while done < num:
    lo, hi = done, min(num, done + chunk)
    start = time.perf_counter()
    result = sampler.generate(hi - lo, labels[lo:hi] if sampler.num_classes else None,
                              seed * 1_000_003 + lo // chunk, progress=False)
    seconds = time.perf_counter() - start
    done = hi
    if main:
      _write_rows(images, directory, lo, result["image"])
      progress["done"] = hi
      progress["seconds"] = progress.get("seconds", 0.0) + seconds
      progress["timed"] = progress.get("timed", 0) + hi - lo
      storage.write_text(progress_path, json.dumps(progress))
    log(f"generated {hi}/{num} candidates ({(hi - lo) / seconds:.2f} img/s)")
  parallel.sync_processes(f"candidates {directory}")  # the files are whole: all may read
  progress = json.loads(storage.read_text(progress_path))
  timed = progress.get("timed", 0)
  return Candidates(_images(directory, (num, image_size, image_size, 3), "r"), labels,
                    progress["seconds"] / timed if timed else None)


def _open_progress(directory: str, key: dict, shape: tuple[int, ...],
                   on_restart: Callable[[], None] | None) -> dict:
  """The progress record of the candidates in `directory` when drawn with `key`; else a
  fresh one over an empty images.npy of `shape`, after removing the old candidates and
  calling `on_restart`."""
  progress_path = storage.join(directory, PROGRESS)
  if storage.exists(progress_path):
    progress = json.loads(storage.read_text(progress_path))
    if progress.get("key") == key:
      return progress
  storage.rmtree(directory)
  if on_restart is not None:
    on_restart()
  storage.makedirs(directory)
  if not storage.is_remote(directory):
    np.lib.format.open_memmap(storage.join(directory, IMAGES), "w+", np.uint8, shape).flush()
  progress = {"key": key, "done": 0}
  storage.write_text(progress_path, json.dumps(progress))
  return progress


# Candidate images: locally one images.npy, memory-mapped and written in place. A bucket
# object cannot be written in place, so there each chunk of rows is its own object,
# images_<first row>.npy, and the images are read back whole into memory.
def _chunk_paths(directory: str) -> list[tuple[int, str]]:
  """(first row, path) of every chunk object of a bucket directory, by row."""
  prefix = IMAGES[:-len(".npy")] + "_"
  return sorted((int(storage.basename(p)[len(prefix):-len(".npy")]), p)
                for p in storage.glob(storage.join(directory, prefix + "*.npy")))


def _images(directory: str, shape: tuple[int, ...], mode: str) -> np.ndarray:
  """uint8 `shape`: images.npy memory-mapped with `mode` ('r' or 'r+': `_write_rows`
  fills it), or a bucket directory's chunks in memory (rows not drawn yet are zeros)."""
  if not storage.is_remote(directory):
    return np.load(storage.join(directory, IMAGES), mmap_mode=mode)
  images = np.zeros(shape, np.uint8)
  for lo, path in _chunk_paths(directory):
    rows = storage.load_npy(path)
    images[lo:lo + len(rows)] = rows
  return images


def _write_rows(images: np.ndarray, directory: str, lo: int, rows: np.ndarray) -> None:
  """Stores rows [lo, lo + len(rows)) of the candidates before progress records them."""
  images[lo:lo + len(rows)] = rows
  if storage.is_remote(directory):
    storage.save_npy(storage.join(directory, f"{IMAGES[:-len('.npy')]}_{lo:09d}.npy"), rows)
  else:
    images.flush()


def score_candidates(scorer: Scorer, candidates: Candidates,
                     class_map: np.ndarray | None = None, block: int = 256
                     ) -> tuple[np.ndarray, float]:
  """(float [M] p(intended class | image) of every candidate, read in blocks; wall-clock
  seconds of scoring per candidate, after a warm-up call that compiles the scorer)."""
  images = candidates.images
  scorer(np.asarray(images[:block]))
  start = time.perf_counter()
  probs = np.concatenate([scorer(np.asarray(images[lo:lo + block]))
                          for lo in range(0, len(images), block)])
  seconds = (time.perf_counter() - start) / max(len(images), 1)
  return rejection.intended_class_scores(probs, candidates.labels, class_map), seconds


def select(scores: np.ndarray | None, labels: np.ndarray, num: int,
           fractions: Sequence[float]) -> tuple[dict[float, np.ndarray], dict[float, float]]:
  """(keep fraction -> bool [M] accepted, keep fraction -> mean score of the accepted
  or None without scores), by `rejection.acceptance_masks`."""
  masks = rejection.acceptance_masks(scores, labels, num, fractions)
  mean = {f: None if scores is None else float(scores[m].mean()) for f, m in masks.items()}
  return masks, mean


def self_judged(selector: str | None, fid_net: str | None, pr_net: str | None
                ) -> list[str]:
  """The metrics computed by the very network that selected the samples (network
  names; selector None or 'trained' is the experiment's own classifier)."""
  if not selector:
    return []
  return [what for what, net in (("FID / IS / FID*", fid_net),
                                 ("precision / recall", pr_net)) if net == selector]


def self_judged_warning(selector: str, metrics_judged: Sequence[str]) -> str:
  """The warning that heads the trade-off section and joins the notes."""
  return (f"SELF-JUDGED: the rejection classifier ({selector}) also computes "
          f"{' and '.join(metrics_judged)} of the samples it selected, so the trade-off "
          "measures the selector's own confidence, not sample quality. Give "
          "evaluate.inception_weights / evaluate.vgg16_weights, or select with the "
          "experiment's classifier (evaluate.rejection_classifier='trained').")


def sampling_cost(candidates: int, accepted: int, guidance: float) -> float:
  """Prior passes per accepted image, in units of one unguided sample: candidates drawn
  per accepted image (about 1 / keep fraction), times 2 under guidance (w != 1 runs the
  prior on a doubled batch)."""
  return candidates / max(accepted, 1) * (1.0 if guidance == 1.0 else 2.0)


def sampling_seconds(candidates: int, accepted: int, keep_fraction: float,
                     generate_s: float | None, score_s: float | None) -> float | None:
  """Measured wall-clock seconds per accepted image: generating every candidate, plus
  scoring them when rejection selects (keep < 1); None when the sampling was not timed."""
  if generate_s is None:
    return None
  per_candidate = generate_s + ((score_s or 0.0) if keep_fraction < 1.0 else 0.0)
  return per_candidate * candidates / max(accepted, 1)


def cas_suffix(keep_fraction: float, guidance: float, base_guidance: float) -> str:
  """What tells one trade-off point's CAS classifier apart: '' for the unrejected samples
  at the sampler's own scale, '_keep<f>' for a keep fraction, '_w<w>' for a guidance
  scale (its name is sample<suffix>_trained, its folder the CAS folder + suffix)."""
  if guidance != base_guidance:
    return f"_w{guidance:g}"
  return "" if keep_fraction == 1.0 else f"_keep{keep_fraction:g}"


def cas_name(keep_fraction: float, guidance: float, base_guidance: float) -> str:
  """The name of the CAS classifier trained on one trade-off point's accepted samples
  ('sample_trained' for the unrejected samples at the sampler's own scale)."""
  return f"sample{cas_suffix(keep_fraction, guidance, base_guidance)}_trained"


def tradeoff_rows(stats: dict[float, distances.SetStats], mean_scores: dict[float, float],
                  num: int, ref, recon_ref, real_pr, opts: EvalOptions,
                  guidance: float = 1.0,
                  seconds: tuple[float | None, float | None] = (None, None)
                  ) -> tuple[list[dict], list[str]]:
  """(rows, notes): one row per keep fraction (descending as given): keep_fraction,
  candidates, guidance (the scale the candidates were drawn at), sampling_cost (counted),
  seconds_per_image (timed, from seconds = (generation, scoring) per candidate),
  mean_class_score and `distances.set_metrics` (FID, FID*, IS, precision/recall)."""
  rows, notes = [], []
  for f, s in stats.items():
    cand = rejection.num_candidates(num, f)
    what = f"samples (keep {f:g})" if guidance == 1.0 else f"samples (keep {f:g}, w {guidance:g})"
    metrics, more = distances.set_metrics(s, ref, recon_ref, real_pr, opts, what)
    notes += more
    rows.append({"keep_fraction": f, "candidates": cand, "guidance": guidance,
                 "sampling_cost": sampling_cost(cand, s.count, guidance),
                 "seconds_per_image": sampling_seconds(cand, s.count, f, *seconds),
                 "mean_class_score": mean_scores[f], **metrics})
  return rows, notes


def attach_cas(rows: list[dict], cas: dict | None, base_guidance: float) -> None:
  """Adds cas_top1 / cas_top5 (the point's sample-trained classifier on the real
  validation images, `cas.ClassifierAccuracy.result` keys) to each row that has one."""
  for row in rows:
    acc = (cas or {}).get(
        f"{cas_name(row['keep_fraction'], row['guidance'], base_guidance)}_on_real")
    if acc is not None:
      row["cas_top1"], row["cas_top5"] = acc["top1"], acc["top5"]


def guidance_grid(by_scale: dict[float, Candidates], class_names: Sequence[str],
                  per_class: int = 2, max_classes: int = 10
                  ) -> tuple[np.ndarray, int, list[str], list[str]]:
  """Tiles for one picture of guidance: a row per class, and for each of its first
  `per_class` candidates one tile per scale side by side. Candidate i of every scale has
  the same intended class and sampling key (`generate_candidates`), so a group shows what
  w does to one draw.

  Fewer than `per_class` per class are shown when there are few candidates.

  Returns (uint8 [rows * cols, S, S, 3], cols, row labels, tile captions)."""
  scales = sorted(by_scale)
  labels = next(iter(by_scale.values())).labels
  n = min(len(c.images) for c in by_scale.values())
  tiles, captions, names = [], [], []
  num_classes = int(labels[:n].max()) + 1 if n else 0
  per_class = max(1, min(per_class, n // max(num_classes, 1)))  # few candidates: fewer
  for c in range(min(max_classes, num_classes)):
    rows = [i for i in np.nonzero(labels[:n] == c)[0][:per_class]]
    if len(rows) < per_class:
      continue
    names.append(class_names[c] if c < len(class_names) else str(c))
    for i in rows:
      for w in scales:
        tiles.append(np.asarray(by_scale[w].images[i]))
        captions.append(f"w {w:g}")
  cols = per_class * len(scales)
  return np.stack(tiles) if tiles else np.zeros((0, 1, 1, 3), np.uint8), cols, names, captions
