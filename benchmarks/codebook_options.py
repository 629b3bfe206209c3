"""Codebook options side by side: stage 1 of a config at equal steps and batch, once per
variant, then per-level code usage and perplexity over the validation set, and its MSE.

  python benchmarks/codebook_options.py --config=configs/demo.py --steps=300 \
      --variants=paper,kmeans,cosine,lookup8,reseed --seeds=0,1,2

Variants (each on top of the config, with re-seeding off unless named):
  paper   : random init, l2, no projection, dead_code_threshold=0 (the paper).
  kmeans  : vqvae.codebook_init=kmeans.   cosine: vqvae.code_distance=cosine.
  lookup8 : vqvae.lookup_dim=8.           reseed: dead_code_threshold=1 (the demo's default).
Usage = fraction of the K codes that code at least one validation latent; perplexity =
exp(entropy) of that histogram; each figure is the mean over the seeds (config.seed: the
initialisation and step keys; the data order is the config's). Prints os.getloadavg() with the table (the CPU is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

VARIANTS = {
    "paper": [],
    "kmeans": ["--config.vqvae.codebook_init=kmeans"],
    "cosine": ["--config.vqvae.code_distance=cosine"],
    "lookup8": ["--config.vqvae.lookup_dim=8"],
    "reseed": ["--config.vqvae.dead_code_threshold=1.0"],
}


def validation_figures(workdir: str) -> dict:
  """Per-level usage / perplexity of the validation codes, and the last validation MSE."""
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.data.sources import make_source  # pylint: disable=g-import-not-at-top
  run = api.load(workdir)
  source = make_source(run.config.data, "val")
  images = np.stack([source.get(i)[0] for i in range(len(source))])
  k = run.config.vqvae.num_codes
  out = {}
  for name, codes in zip(run.level_names, run.encode(images)):
    counts = np.bincount(codes.reshape(-1), minlength=k)
    p = counts / counts.sum()
    out[name] = (float(np.mean(counts > 0)),
                 float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))))
  with open(os.path.join(workdir, "vqvae", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  val = [r for r in rows if r.get("split") == "val"]
  out["val_mse"] = val[-1]["mse"] if val else float("nan")
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--figures", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.figures:  # child: figures of one trained workdir, as JSON on the last line
    print(json.dumps(validation_figures(args.workdir)))
    return
  rows = []
  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      sys.exit(f"unknown variant {variant!r}: choose from {sorted(VARIANTS)}")
    runs, warned = [], 0
    for seed in args.seeds.split(","):
      workdir = tempfile.mkdtemp(prefix=f"codebook_{variant}_{seed}_")
      reseed = [] if variant == "reseed" else ["--config.vqvae.dead_code_threshold=0.0"]
      cmd = [sys.executable, "-m", "vqvae2_jax.main", f"--config={args.config}:vqvae",
             f"--workdir={workdir}", f"--config.vqvae_train.steps={args.steps}",
             f"--config.seed={seed}", "--config.vqvae_train.image_every=0", *reseed,
             *VARIANTS[variant]]
      start = time.time()
      train = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if train.returncode:
        sys.exit(f"{variant}: stage 1 failed:\n{train.stderr[-3000:]}")
      warned += sum("warning at step" in line for line in train.stdout.splitlines())
      child = subprocess.run([sys.executable, __file__, "--figures", f"--workdir={workdir}"],
                             capture_output=True, text=True, check=True)
      runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
      print(f"{variant} seed {seed}: {runs[-1]} ({time.time() - start:.0f}s, "
            f"load {os.getloadavg()[0]:.1f})", flush=True)
    figures = {k: np.mean([r[k] for r in runs], axis=0).tolist() for k in runs[0]}
    rows.append((variant, figures, None, warned))
  levels = [k for k in rows[0][1] if k != "val_mse"]
  head = " | ".join(f"{l} usage | {l} perplexity" for l in levels)
  print(f"\n| variant | {head} | val MSE | usage warnings (all seeds) |")
  print("|" + "---|" * (2 * len(levels) + 3))
  for variant, figures, _, warned in rows:
    cells = " | ".join(f"{figures[l][0]:.1%} | {figures[l][1]:.1f}" for l in levels)
    print(f"| {variant} | {cells} | {figures['val_mse']:.4f} | {warned} |")
  print(f"\nloadavg {os.getloadavg()}")


if __name__ == "__main__":
  main()
