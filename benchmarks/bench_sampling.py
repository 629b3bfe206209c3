"""Sampler speed for PixelSNAILPrior, side by side: incremental, reference, public sampler.

Three measurements, all after a compile warm-up run and with `os.getloadavg()` printed:

* default table: one teacher-forced forward pass, the incremental sampler and the
  reference sampler (one full forward pass per position: on large grids timed on the first
  `--ref-positions` positions and extrapolated, marked '*') over the same batch;
* `--sweep 1,4,16,64`: per-image time of the incremental sampler and its cost in forward
  passes of the same batch, for the 32x32 top prior (with attention) and the 64x64
  conditional prior, and for one 256px-shaped image (both levels);
* `--peer-src PATH`: the public PyTorch sampler (rosinality/vq-vae-2-pytorch `sample.py`'s
  `sample_model` loop, its `PixelSNAIL` imported unmodified from the checkout at PATH; never
  copied here) at the same batch with priors of equal parameter count. Its sampler calls
  the whole model on rows 0..i for every position (i, j), so a call's cost grows with i: it
  is timed per call at `--peer-rows` rows and summed over all H * W calls by linear
  interpolation over rows. Skipped with a note when PATH has no pixelsnail.py.

Prior sizes (float32 parameters, K = 512): ours top32 hidden 72, 10 gated layers, 2 x
4-head attention, 2 output blocks, 10 classes: 3.05M; cond64 hidden 96, 10 gated layers,
4 conditioning blocks, 10 classes: 6.07M. Public top: PixelSNAIL([32, 32], 512, channel 64,
kernel 5, 2 blocks, 4 res blocks, res channel 64, attention): 3.15M; public bottom:
PixelSNAIL([64, 64], 512, 64, 5, 4 blocks, 4 res blocks, 64, attention=False, 3 conditioning
res blocks of 64): 6.26M (sample.py's block structure).

  python benchmarks/bench_sampling.py                 # demo, 32x32 top, 64x64 cond
  python benchmarks/bench_sampling.py --only top32 cond64 --sweep 1,4,16,64
  python benchmarks/bench_sampling.py --only top32 cond64 --sweep 16 --peer-src /tmp/peer
"""
from __future__ import annotations

import argparse
import os
import sys
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


def _count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _time(fn, repeats: int) -> float:
  """Median wall time of fn() over `repeats` runs, after one warm-up (compile) run."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _print_header(header: str):
  """Prints a table header and a rule under it."""
  print(header)
  print("-" * len(header))


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def bench(name: str, model: PixelSNAILPrior, b: int, h: int, w: int, args,
          reference: bool = True) -> dict:
  """Times one teacher-forced forward pass and the samplers on a [b, h, w] code grid.

  args needs repeats, ref_full_max and ref_positions. Returns seconds per batch:
  fwd, inc and (with reference) ref, plus the parameter count."""
  params, codes, cond, labels = _params(model, b, h, w)
  forward = jax.jit(lambda p, c: model.apply({"params": p}, c, cond, labels, train=False))
  key = jax.random.key(0)
  kw = dict(shape=(b, h, w), cond_codes=cond, labels=labels)
  t_fwd = _time(lambda: forward(params, codes), args.repeats)
  t_inc = _time(lambda: sample_incremental(model, params, key, **kw), args.repeats)
  # The forward pass again after the sampler: the ratio is taken between neighbours.
  t_fwd = min(t_fwd, _time(lambda: forward(params, codes), args.repeats))
  n = h * w
  row = dict(name=name, grid=f"{h}x{w}", batch=b, hidden=model.hidden,
             layers=model.num_layers, params=_count(params),
             attn=model.num_layers // model.attention_every if model.attention_every else 0,
             fwd=t_fwd, inc=t_inc, load=_load())
  if reference:
    sub = n if n <= args.ref_full_max else min(n, args.ref_positions)
    t_ref = _time(lambda: sample_reference(model, params, key, num_positions=sub, **kw), 1)
    row.update(ref=t_ref * n / sub, extrapolated=sub < n, ref_pos=sub)
  return row


def priors(args) -> dict:
  """name -> (model, grid size) for every benchmarked prior shape."""
  # CPU-sized priors keep their layers unrolled, as the CPU configs do (config_lib.cpu_priors);
  # --scan-layers times the paper configs' layout, whose decoding step scans the layers.
  common = dict(num_codes=args.num_codes, kernel_size=5, dropout=0.0, attn_dropout=0.0,
                scan_layers=args.scan_layers)
  d, th, ch = args.demo_hidden, args.top_hidden, args.cond_hidden
  return {
      "demo_top": (PixelSNAILPrior(hidden=d, res_hidden=d, num_layers=4, attention_every=2,
                                   num_heads=4, num_output_layers=1, **common), args.demo_top),
      "demo_bottom": (PixelSNAILPrior(hidden=d, res_hidden=d, num_layers=4, num_cond_layers=2,
                                      num_cond_levels=1,
                                      cond_scales=(args.demo_bottom // args.demo_top,),
                                      **common), args.demo_bottom),
      "top32": (PixelSNAILPrior(hidden=th, res_hidden=2 * th, num_layers=args.top_layers,
                                attention_every=args.attention_every, num_heads=4,
                                num_output_layers=2, num_classes=10, **common), args.top_size),
      "cond64": (PixelSNAILPrior(hidden=ch, res_hidden=2 * ch, num_layers=args.cond_layers,
                                 num_cond_layers=args.cond_blocks, num_cond_levels=1,
                                 cond_scales=(2,), num_classes=10, **common), args.cond_size),
  }


# ---- the public PyTorch sampler ----

def _peer_models(path: str):
  """Public PixelSNAIL top (3.15M) and bottom (6.26M) priors from the checkout at path."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(path))
  from pixelsnail import PixelSNAIL  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  top = PixelSNAIL([32, 32], 512, 64, 5, 2, 4, 64, dropout=0.0)
  bottom = PixelSNAIL([64, 64], 512, 64, 5, 4, 4, 64, attention=False, dropout=0.0,
                      n_cond_res_block=3, cond_res_channel=64)
  return {"top32": (top.eval(), 32, None), "cond64": (bottom.eval(), 64, 32)}


def peer_time(model, size: int, cond_size: int | None, batch: int, rows: int,
              repeats: int = 2) -> dict:
  """Seconds per batch of the public sampler on a size x size grid, extrapolated.

  Runs the body of sample.py's `sample_model` (model on rows 0..i with its cache, softmax
  at (i, j), multinomial) at `rows` rows spread over the grid, one call each after the
  first (conditioning-cache) call, and sums the interpolated per-call cost over all calls.
  """
  import torch  # pylint: disable=g-import-not-at-top
  canvas = torch.zeros(batch, size, size, dtype=torch.int64)
  condition = (None if cond_size is None else
               torch.randint(0, 512, (batch, cond_size, cond_size), dtype=torch.int64))

  def call(i, j, cache):
    t = time.perf_counter()
    with torch.no_grad():
      out, cache = model(canvas[:, :i + 1, :], condition=condition, cache=cache)
      prob = torch.softmax(out[:, :, i, j] / 1.0, 1)
      canvas[:, i, j] = torch.multinomial(prob, 1).squeeze(-1)
    return time.perf_counter() - t, cache

  first, cache = call(0, 0, {})
  at = sorted(set(np.linspace(0, size - 1, rows).round().astype(int).tolist()))
  per_call = [min(call(i, size // 2, cache)[0] for _ in range(repeats)) for i in at]
  all_rows = np.interp(np.arange(size), at, per_call)
  total = float(size * all_rows.sum() + max(first - all_rows[0], 0.0))
  return dict(total=total, first=first, rows=at, per_call=per_call)


def run_peer(args, ours: dict):
  """Prints the public sampler's time beside ours at each sweep batch."""
  if not args.peer_src or not os.path.exists(os.path.join(args.peer_src, "pixelsnail.py")):
    print(f"\n--peer-src {args.peer_src!r}: no pixelsnail.py there; public sampler skipped "
          "(export rosinality/vq-vae-2-pytorch and pass its directory).")
    return
  import torch  # pylint: disable=g-import-not-at-top
  if args.peer_threads:
    torch.set_num_threads(args.peer_threads)
  models = _peer_models(args.peer_src)
  print(f"\npublic sampler ({args.peer_src}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), per call at {args.peer_rows} rows, extrapolated")
  header = (f"{'prior':<8}{'batch':>6}{'params':>9}{'ours':>9}{'calls s (first row..last)':>36}"
            f"{'public s/img':>14}{'ours s/img':>12}{'ratio':>8}  load")
  _print_header(header)
  per_image = {}
  for b in args.sweep:
    for name, (model, size, cond_size) in models.items():
      if (name, b) not in ours:
        continue
      r = peer_time(model, size, cond_size, b, args.peer_rows, args.repeats)
      mine = ours[(name, b)]
      n_params = sum(p.numel() for p in model.parameters())
      calls = " ".join(f"{t:.3f}" for t in r["per_call"])
      pub, inc = r["total"] / b, mine["inc"] / b
      per_image[(name, b)] = (pub, inc)
      print(f"{name:<8}{b:>6}{n_params / 1e6:>8.2f}M{mine['params'] / 1e6:>8.2f}M{calls:>36}"
            f"{pub:>14.1f}{inc:>12.3f}{pub / inc:>8.0f}  {_load()}", flush=True)
    if ("top32", b) in per_image and ("cond64", b) in per_image:
      pub = per_image[("top32", b)][0] + per_image[("cond64", b)][0]
      inc = per_image[("top32", b)][1] + per_image[("cond64", b)][1]
      print(f"{'256px':<8}{b:>6}{'':>54}{pub:>14.1f}{inc:>12.3f}{pub / inc:>8.0f}  "
            "(one 256px-shaped image: top32 + cond64)")


def run_sweep(args, runs: dict) -> dict:
  """Incremental sampler per-image time and forward-pass multiples at each batch."""
  print("\nbatch sweep: incremental sampler per image and in forward passes of the same batch")
  header = (f"{'prior':<12}{'grid':>7}{'params':>9}{'batch':>6}{'forward s':>11}{'incr s':>9}"
            f"{'incr s/img':>12}{'incr/fwd':>10}  load")
  _print_header(header)
  out = {}
  for b in args.sweep:
    for name in runs:
      model, size = runs[name]
      r = bench(name, model, b, size, size, args, reference=False)
      out[(name, b)] = r
      print(f"{name:<12}{r['grid']:>7}{r['params'] / 1e6:>8.2f}M{b:>6}{r['fwd']:>11.4f}"
            f"{r['inc']:>9.3f}{r['inc'] / b:>12.4f}{r['inc'] / r['fwd']:>10.2f}  {r['load']}",
            flush=True)
    if ("top32", b) in out and ("cond64", b) in out:
      img = (out[("top32", b)]["inc"] + out[("cond64", b)]["inc"]) / b
      print(f"{'256px':<12}{'':>22}{b:>6}{'':>20}{img:>12.4f}  (top32 + cond64 per image)")
  return out


def main():
  """Runs the requested comparisons and prints their tables."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4, help="batch of the default table")
  ap.add_argument("--num-codes", type=int, default=512)
  ap.add_argument("--demo-hidden", type=int, default=64, help="demo-sized priors' width")
  ap.add_argument("--demo-top", type=int, default=8, help="demo top grid size")
  ap.add_argument("--demo-bottom", type=int, default=16, help="demo bottom grid size")
  ap.add_argument("--top-hidden", type=int, default=72, help="top32 width (72: 3.05M)")
  ap.add_argument("--cond-hidden", type=int, default=96, help="cond64 width (96: 6.07M)")
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
  ap.add_argument("--scan-layers", action="store_true",
                  help="the paper configs' scanned layer stacks (a smaller program, slower "
                       "on a CPU) instead of the CPU configs' unrolled ones")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--only", nargs="*", default=None,
                  help="subset of: demo_top demo_bottom top32 cond64")
  ap.add_argument("--sweep", default="",
                  help="comma list of batch sizes: print the sweep instead of the table")
  ap.add_argument("--peer-src", default="",
                  help="checkout of rosinality/vq-vae-2-pytorch: time its sampler too")
  ap.add_argument("--peer-rows", type=int, default=4,
                  help="rows at which the public sampler's call is timed")
  ap.add_argument("--peer-threads", type=int, default=0,
                  help="torch threads for the public sampler (0 = torch's default); on a "
                       "loaded machine 1 thread runs it fastest")
  args = ap.parse_args()
  args.sweep = [int(s) for s in args.sweep.split(",") if s]
  all_runs = priors(args)
  unknown = set(args.only or ()) - set(all_runs)
  if unknown:
    raise SystemExit(f"--only: unknown prior(s) {sorted(unknown)}; use {sorted(all_runs)}")
  runs = {n: all_runs[n] for n in (args.only or all_runs)}
  print(f"backend={jax.default_backend()} devices={jax.device_count()} K={args.num_codes} "
        f"load(1/5/15 min)={_load()}")
  if args.sweep:
    ours = run_sweep(args, runs)
    if args.peer_src:
      run_peer(args, ours)
    return
  header = (f"{'prior':<12}{'grid':>7}{'hid':>5}{'lay':>5}{'attn':>5}{'forward s':>11}"
            f"{'incr s':>9}{'ref s':>11}{'ref/incr':>10}{'incr/fwd':>10}  load")
  print(f"batch={args.batch}")
  _print_header(header)
  for name, (model, size) in runs.items():
    r = bench(name, model, args.batch, size, size, args)
    star = "*" if r["extrapolated"] else " "
    print(f"{name:<12}{r['grid']:>7}{r['hidden']:>5}{r['layers']:>5}{r['attn']:>5}"
          f"{r['fwd']:>11.4f}{r['inc']:>9.3f}{r['ref']:>10.1f}{star}{r['ref'] / r['inc']:>10.0f}"
          f"{r['inc'] / r['fwd']:>10.1f}  {r['load']}", flush=True)
  print("* reference timed on the first --ref-positions positions and extrapolated linearly "
        "(it runs one full forward pass per position).")


if __name__ == "__main__":
  main()
