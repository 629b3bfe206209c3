"""Codebook options side by side: stage 1 of a config at equal steps and batch, once per
variant, then per-level code usage and perplexity over the validation set, and its MSE.

  python benchmarks/codebook_options.py --config=configs/demo.py --steps=300 \
      --variants=paper,kmeans,lookup8,reseed --seeds=0,1,2

Variants (each on top of the config, with re-seeding off unless named):
  paper   : random init, l2, no projection, dead_code_threshold=0 (the paper).
  kmeans  : vqvae.codebook_init=kmeans.   lookup8: vqvae.lookup_dim=8.
  reseed  : dead_code_threshold=1 (the demo's default).   lookup8_reseed: both.
(The cosine variants measured in benchmarks/README.md went with the option.)
Usage = fraction of the K codes that code at least one validation latent; perplexity =
exp(entropy) of that histogram; each figure is the mean over the seeds (config.seed: the
initialisation and step keys; the data order is the config's). Prints os.getloadavg()
with the table (the CPU is shared).

--prior-steps N also extracts the codes and trains every prior of the config for N steps
on each variant's codes, then reports the priors' code length of the validation images
in bits per image, per level and in all (`Run.log_prob`: -log2 p(codes), conditioned on
the true class when the priors are class-conditional). Fewer bits at equal prior steps
means codes that are cheaper to model; a codebook that uses few codes is cheap to model
too, so read it beside usage and MSE. --root DIR keeps the workdirs as DIR/<variant>_<seed>
and resumes them (a rerun with more --prior-steps trains on from what is there).
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

RESEED = ["--config.vqvae.dead_code_threshold=1.0"]
VARIANTS = {
    "paper": [],
    "kmeans": ["--config.vqvae.codebook_init=kmeans"],
    "lookup8": ["--config.vqvae.lookup_dim=8"],
    "reseed": RESEED,
    "lookup8_reseed": ["--config.vqvae.lookup_dim=8", *RESEED],
}


def validation_figures(workdir: str, with_bits: bool) -> dict:
  """Per-level usage / perplexity of the validation codes, the last validation MSE and,
  with_bits, the priors' mean bits per image per level ('bits <level>') and in all."""
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.data.sources import make_source  # pylint: disable=g-import-not-at-top
  run = api.load(workdir)
  source = make_source(run.config.data, "val")
  pairs = [source.get(i) for i in range(len(source))]
  images = np.stack([image for image, _ in pairs])
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
  if with_bits:
    labels = (np.array([int(label) for _, label in pairs], np.int32) if run.num_classes
              else None)
    bits = {"bits": [], **{name: [] for name in run.level_names}}
    for lo in range(0, len(images), 256):  # bounded memory on big validation sets
      part = run.log_prob(images[lo:lo + 256], None if labels is None else labels[lo:lo + 256])
      bits["bits"].append(part["bits"])
      for name in run.level_names:
        bits[name].append(part["levels"][name])
    for name, values in bits.items():
      out["bits" if name == "bits" else f"bits {name}"] = float(np.concatenate(values).mean())
  return out


def train_priors(config: str, workdir: str, steps: int, seed: str, variant: str) -> None:
  """Extracts the codes of `workdir`'s stage 1 and trains each prior `steps` steps (the
  model fields come from what stage 1 recorded, so none are repeated here; the levels
  from the manifest the extraction writes)."""
  from vqvae2_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top

  def run(stage: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "vqvae2_jax.main", f"--config={config}:{stage}",
           f"--workdir={workdir}", "--verbosity=-1", f"--config.seed={seed}", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
      sys.exit(f"{variant}: {stage} failed:\n{done.stderr[-3000:]}")

  run("extract")
  for level in Workdir(workdir).manifest()["levels"]:
    run(f"prior_{level}", f"--config.priors.{level}.train.steps={steps}",
        f"--config.priors.{level}.train.eval_every={steps}")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--prior-steps", type=int, default=0,
                      help="also train the priors this many steps and report bits per image")
  parser.add_argument("--root", default="", help="keep (and resume) workdirs under here")
  parser.add_argument("--figures", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.figures:  # child: figures of one trained workdir, as JSON on the last line
    print(json.dumps(validation_figures(args.workdir, args.prior_steps > 0)))
    return
  rows = []
  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      sys.exit(f"unknown variant {variant!r}: choose from {sorted(VARIANTS)}")
    runs, warned = [], 0
    for seed in args.seeds.split(","):
      if args.root:
        workdir = os.path.join(args.root, f"{variant}_{seed}")
        os.makedirs(workdir, exist_ok=True)
      else:
        workdir = tempfile.mkdtemp(prefix=f"codebook_{variant}_{seed}_")
      reseed = [] if "reseed" in variant else ["--config.vqvae.dead_code_threshold=0.0"]
      cmd = [sys.executable, "-m", "vqvae2_jax.main", f"--config={args.config}:vqvae",
             f"--workdir={workdir}", f"--config.vqvae_train.steps={args.steps}",
             f"--config.seed={seed}", "--config.vqvae_train.image_every=0", *reseed,
             *VARIANTS[variant]]
      start = time.time()
      train = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if train.returncode:
        sys.exit(f"{variant}: stage 1 failed:\n{train.stderr[-3000:]}")
      warned += sum("warning at step" in line for line in train.stdout.splitlines())
      if args.prior_steps:
        train_priors(args.config, workdir, args.prior_steps, seed, variant)
      child = subprocess.run([sys.executable, __file__, "--figures", f"--workdir={workdir}",
                              f"--prior-steps={args.prior_steps}"],
                             capture_output=True, text=True, check=True)
      runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
      print(f"{variant} seed {seed}: {runs[-1]} ({time.time() - start:.0f}s, "
            f"load {os.getloadavg()[0]:.1f})", flush=True)
    figures = {k: np.mean([r[k] for r in runs], axis=0).tolist() for k in runs[0]}
    rows.append((variant, figures, None, warned))
  levels = [k for k in rows[0][1] if k != "val_mse" and not k.startswith("bits")]
  bits = [k for k in rows[0][1] if k.startswith("bits")]
  head = " | ".join(f"{l} usage | {l} perplexity" for l in levels)
  bits_head = "".join(f" {k.replace('bits', 'prior bits/image')} |" for k in bits)
  print(f"\n| variant | {head} | val MSE |{bits_head} usage warnings (all seeds) |")
  print("|" + "---|" * (2 * len(levels) + len(bits) + 3))
  for variant, figures, _, warned in rows:
    cells = " | ".join(f"{figures[l][0]:.1%} | {figures[l][1]:.1f}" for l in levels)
    bits_cells = "".join(f" {figures[k]:.1f} |" for k in bits)
    print(f"| {variant} | {cells} | {figures['val_mse']:.4f} |{bits_cells} {warned} |")
  print(f"\nloadavg {os.getloadavg()}")


if __name__ == "__main__":
  main()
