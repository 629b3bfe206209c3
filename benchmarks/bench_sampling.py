"""Reference vs incremental sampler speed for PixelSNAILPrior, side by side.

For each prior it times (after a compile warm-up run) one teacher-forced forward pass,
the incremental sampler and the reference sampler over the same batch, and prints the
speed-up and the incremental sampler's cost in forward passes. The reference sampler runs
one full forward pass per position, so its cost is linear in the number of positions; on
large grids it is timed on the first `--ref-positions` positions and extrapolated (marked
'*' in the table).

  python benchmarks/bench_sampling.py                 # demo, 32x32 top, 64x64 cond
  python benchmarks/bench_sampling.py --only top32 --batch 8 --hidden 128
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.train.state import numpy_params
from vqvae2_jax.sampling.incremental import sample_incremental
from vqvae2_jax.sampling.reference import sample_reference


def _params(model, b, h, w):
  """Random params from numpy (avoids compiling PRNG kernels; timing does not care)."""
  codes = jnp.zeros((b, h, w), jnp.int32)
  cond = tuple(jnp.zeros((b, h // s, w // s), jnp.int32) for s in model.cond_scales)
  labels = jnp.zeros((b,), jnp.int32) if model.num_classes else None
  params = numpy_params(lambda k: model.init(k, codes, cond, labels, train=False))
  return params, codes, cond, labels


def _time(fn, repeats: int) -> float:
  """Median wall time of fn() over `repeats` runs, after one warm-up (compile) run."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bench(name: str, model: PixelSNAILPrior, b: int, h: int, w: int, args) -> dict:
  """Times one teacher-forced forward pass and both samplers on a [b, h, w] code grid."""
  params, codes, cond, labels = _params(model, b, h, w)
  forward = jax.jit(lambda p, c: model.apply({"params": p}, c, cond, labels, train=False))
  key = jax.random.key(0)
  kw = dict(shape=(b, h, w), cond_codes=cond, labels=labels)
  t_fwd = _time(lambda: forward(params, codes), args.repeats)
  t_inc = _time(lambda: sample_incremental(model, params, key, **kw), args.repeats)
  n = h * w
  sub = n if n <= args.ref_full_max else min(n, args.ref_positions)
  t_ref = _time(lambda: sample_reference(model, params, key, num_positions=sub, **kw), 1)
  t_ref *= n / sub
  return dict(name=name, grid=f"{h}x{w}", batch=b, hidden=model.hidden,
              layers=model.num_layers,
              attn=model.num_layers // model.attention_every if model.attention_every else 0,
              fwd=t_fwd, inc=t_inc, ref=t_ref, extrapolated=sub < n, ref_pos=sub)


def main():
  """Runs the sampler comparison for every model shape and prints the ratios."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--num-codes", type=int, default=512)
  ap.add_argument("--demo-hidden", type=int, default=64, help="demo-sized priors' width")
  ap.add_argument("--demo-top", type=int, default=8, help="demo top grid size")
  ap.add_argument("--demo-bottom", type=int, default=16, help="demo bottom grid size")
  ap.add_argument("--hidden", type=int, default=64, help="32x32 / 64x64 priors' width")
  ap.add_argument("--top-size", type=int, default=32)
  ap.add_argument("--top-layers", type=int, default=10)
  ap.add_argument("--attention-every", type=int, default=5)
  ap.add_argument("--cond-size", type=int, default=64)
  ap.add_argument("--cond-layers", type=int, default=10)
  ap.add_argument("--cond-blocks", type=int, default=4)
  ap.add_argument("--ref-positions", type=int, default=32,
                  help="positions the reference sampler is timed on for large grids")
  ap.add_argument("--ref-full-max", type=int, default=256,
                  help="grids with at most this many positions run the reference fully")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--only", nargs="*", default=None,
                  help="subset of: demo_top demo_bottom top32 cond64")
  args = ap.parse_args()

  common = dict(num_codes=args.num_codes, kernel_size=5, dropout=0.0, attn_dropout=0.0)
  d, hd = args.demo_hidden, args.hidden
  runs = {
      "demo_top": lambda: (PixelSNAILPrior(hidden=d, res_hidden=d, num_layers=4,
                                           attention_every=2, num_heads=4, num_output_layers=1,
                                           **common), args.demo_top),
      "demo_bottom": lambda: (PixelSNAILPrior(hidden=d, res_hidden=d, num_layers=4,
                                              num_cond_layers=2, num_cond_levels=1,
                                              cond_scales=(args.demo_bottom // args.demo_top,),
                                              **common), args.demo_bottom),
      "top32": lambda: (PixelSNAILPrior(hidden=hd, res_hidden=2 * hd, num_layers=args.top_layers,
                                        attention_every=args.attention_every, num_heads=4,
                                        num_output_layers=2, num_classes=10, **common),
                        args.top_size),
      "cond64": lambda: (PixelSNAILPrior(hidden=hd, res_hidden=2 * hd,
                                         num_layers=args.cond_layers,
                                         num_cond_layers=args.cond_blocks, num_cond_levels=1,
                                         cond_scales=(2,), num_classes=10, **common),
                         args.cond_size),
  }
  print(f"backend={jax.default_backend()} devices={jax.device_count()} batch={args.batch} "
        f"K={args.num_codes}")
  header = (f"{'prior':<12}{'grid':>7}{'hid':>5}{'lay':>5}{'attn':>5}{'forward s':>11}"
            f"{'incr s':>9}{'ref s':>11}{'ref/incr':>10}{'incr/fwd':>10}")
  print(header)
  print("-" * len(header))
  for name in args.only or list(runs):
    model, size = runs[name]()
    r = bench(name, model, args.batch, size, size, args)
    star = "*" if r["extrapolated"] else " "
    print(f"{name:<12}{r['grid']:>7}{r['hidden']:>5}{r['layers']:>5}{r['attn']:>5}"
          f"{r['fwd']:>11.4f}{r['inc']:>9.3f}{r['ref']:>10.1f}{star}{r['ref'] / r['inc']:>10.0f}"
          f"{r['inc'] / r['fwd']:>10.1f}", flush=True)
  print("* reference timed on the first --ref-positions positions and extrapolated linearly "
        "(it runs one full forward pass per position).")


if __name__ == "__main__":
  main()
