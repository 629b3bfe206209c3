"""What an accepted sample costs: classifier-free guidance against rejection, timed side by side.

On a trained, class-conditional run (priors trained with label_dropout > 0), times in one
process, interleaved over --repeats rounds after a compile warm-up of each:

* plain ancestral sampling (w = 1) of --batch images, every level, decoded to pixels;
* guided sampling at each --guidance scale (one pass over a doubled batch per level);
* scoring those images with the rejection classifier (--scorer trained | efficientnet_lite0).

and prints the seconds per *accepted* image of each way to spend compute: rejection at keep
fraction f draws and scores ceil(n / f) candidates, guidance draws n once. Ratios are to
plain sampling, measured in the same run (absolute seconds mean something only beside
the load printed with them). The guided sampler's cost does not depend on w (any w != 1
runs the same program), so one scale is enough; several check that.

  python benchmarks/bench_guidance.py --workdir=runs/imagenette64_guided --batch=16
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True, help="a trained run (label_dropout > 0)")
  ap.add_argument("--batch", type=int, default=16, help="images per sampler call")
  ap.add_argument("--guidance", default="2", help="comma-separated scales != 1")
  ap.add_argument("--keep", default="0.5,0.25", help="rejection keep fractions")
  ap.add_argument("--scorer", default="trained", choices=("trained", "efficientnet_lite0"))
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  import vqvae2_jax  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.sampling.hierarchical import SampleOptions  # pylint: disable=g-import-not-at-top
  run = vqvae2_jax.load(args.workdir)
  if not run.num_classes:
    raise SystemExit(f"{args.workdir}: the priors are unconditional; guidance needs classes")
  s = run.config.sample
  base = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, sampler=s.sampler,
              batch_size=args.batch)
  scales = [float(w) for w in args.guidance.split(",")]
  samplers = {1.0: run.sampler(SampleOptions(**base))}
  samplers.update({w: run.sampler(SampleOptions(**base, guidance=w)) for w in scales})
  score = run.scorer(args.scorer, batch_size=args.batch)
  labels = np.resize(np.arange(run.num_classes, dtype=np.int32), args.batch)
  images = {}
  for w, sampler in samplers.items():  # compile each program outside the clock
    images[w] = sampler.generate(args.batch, labels, seed=0, progress=False)["image"]
  score(images[1.0])

  times = {w: [] for w in samplers} | {"score": []}
  for r in range(args.repeats):
    for w, sampler in samplers.items():
      times[w].append(_timed(lambda: sampler.generate(args.batch, labels, seed=r + 1,
                                                      progress=False)))
    times["score"].append(_timed(lambda: score(images[1.0])))
  per_image = {k: statistics.median(v) / args.batch for k, v in times.items()}
  plain, scoring = per_image[1.0], per_image["score"]

  print(f"workdir {os.path.abspath(args.workdir)}; batch {args.batch}; "
        f"{args.repeats} interleaved rounds (medians); scorer {args.scorer}; "
        f"load {os.getloadavg()}")
  print(f"plain sampling {plain * 1e3:.1f} ms / image, scoring {scoring * 1e3:.2f} ms / image\n")
  print("| way to an accepted image | candidates / accepted | s / accepted image | "
        "x plain |")
  print("|---|---|---|---|")
  print(f"| plain (w = 1, keep 1) | 1 | {plain:.4f} | 1.00 |")
  for f in (float(x) for x in args.keep.split(",")):
    ratio = math.ceil(args.batch / f) / args.batch
    cost = ratio * (plain + scoring)
    print(f"| rejection, keep {f:g} | {ratio:.2f} | {cost:.4f} | {cost / plain:.2f} |")
  for w in scales:
    print(f"| guidance w = {w:g} | 1 | {per_image[w]:.4f} | {per_image[w] / plain:.2f} |")
  print(f"\nloadavg {os.getloadavg()}")


if __name__ == "__main__":
  main()
