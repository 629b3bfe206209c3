r"""Accelerator benchmark kit: one run, one JSON file of figures.

On a single GPU or TPU host (under ~8 minutes):
  python benchmarks/accelerator.py --out benchmarks/results/$(date +%F)_<device>.json
On a CPU (what the tests run):
  python benchmarks/accelerator.py --small --out /tmp/acc.json

Measures, in bfloat16 compute with float32 parameters:
  * stage-1 training images/s and model FLOP utilisation for `imagenet256` (256x256, the
    paper's widths), plus encode / decode images/s;
  * top- and bottom-prior training latents/s and FLOP utilisation at the paper's widths
    (Table 3; `--prior-layers` trims the depth when memory demands it);
  * reference vs incremental sampling time for a 32x32 top prior and a 64x64 conditional
    bottom prior (the reference extrapolated from its first positions);
  * incremental samples/s of the paper-size ImageNet-256 priors over a batch sweep and the
    projected time for 50,000 256px samples at the best batch;
  * peak device memory, and first the memory plan (benchmarks/memory_plan.py) of stage 1
    and the top prior compiled for this device next to their measured peak, to calibrate
    the CPU-made plan of the paper configs.
FLOP utilisation = XLA's cost-analysis FLOPs per step / step time / the device's peak
bf16 FLOP/s (a table of known devices, or --peak-tflops).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_prior  # noqa: E402  pylint: disable=g-import-not-at-top
import bench_sampling  # noqa: E402  pylint: disable=g-import-not-at-top
import bench_vqvae  # noqa: E402  pylint: disable=g-import-not-at-top
import memory_plan  # noqa: E402  pylint: disable=g-import-not-at-top

from vqvae2_jax.models.prior import PixelSNAILPrior  # noqa: E402
from vqvae2_jax import builders  # noqa: E402

# Dense bf16 peak FLOP/s by device-kind substring (vendor figures, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
                    "TPU v6": 918.0}


def peak_tflops(device, override: float | None) -> float | None:
  """Peak dense bf16 TFLOP/s of `device` (override wins; None when unknown)."""
  if override:
    return override
  for key, value in PEAK_BF16_TFLOPS.items():
    if key.lower() in device.device_kind.lower():
      return value
  return None


def peak_memory_bytes(device) -> int | None:
  """Peak bytes allocated on `device` so far, or None where the backend keeps no stats."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # CPU backends may not implement memory_stats
    return None
  return stats.get("peak_bytes_in_use")


def timed(fn, steps: int, warmup: int = 1) -> float:
  """Median seconds per call of fn() (fn blocks until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def utilisation(flops_per_step, seconds, peak):
  """Model FLOP utilisation: achieved FLOP/s over the peak (None without either)."""
  if not flops_per_step or not peak:
    return None
  return flops_per_step / seconds / (peak * 1e12)


def stage1(args, peak) -> dict:
  """imagenet256 stage-1 training in bf16: images/s, FLOPs per step, MFU."""
  arg = "vqvae,tiny" if args.small else "vqvae"
  config = bench_vqvae.load_config("imagenet256", arg)
  size = config.data.image_size
  b = bench_vqvae.JaxVQVAEBench(config, "imagenet256", args.vqvae_batch, size, jnp.bfloat16)
  out = {"batch": args.vqvae_batch, "image_size": size, "params": b.params,
         "upsample": b.upsample, "compile_s": b.compile_s}
  for op in ("train", "encode", "decode"):
    sec = timed(getattr(b, op), args.steps)
    flops = (b.flops[op] or 0) * args.vqvae_batch
    out[op] = {"images_per_sec": args.vqvae_batch / sec, "step_s": sec,
               "flops_per_step": flops or None, "mfu": utilisation(flops, sec, peak)}
  return out


def priors(args, peak) -> dict:
  """Top and bottom prior training at the paper's widths: latents/s, FLOPs per step, MFU."""
  arg = "prior_top,tiny" if args.small else "prior_top"
  config = bench_vqvae.load_config("imagenet256", arg)
  manifest = bench_prior.manifest_for(config, num_classes=1000)
  results = {}
  for level in ("top", "bottom"):
    with config.unlocked():
      if args.prior_layers:
        config.priors[level].num_layers = args.prior_layers
    prior = builders.build_prior(config, level, manifest, jnp.bfloat16)
    bench = bench_prior.JaxPriorBench(f"imagenet256_{level}", prior, manifest, level,
                                      config.priors[level].train, args.prior_batch)
    sec = timed(bench.train, args.steps)
    results[level] = {"batch": args.prior_batch, "grid": bench.grid, "params": bench.params,
                      "widths": bench.widths, "compile_s": bench.compile_s, "step_s": sec,
                      "latents_per_sec": bench.latents / sec,
                      "flops_per_step": bench.flops,
                      "mfu": utilisation(bench.flops, sec, peak)}
  return results


def memory(args) -> dict:
  """The memory plan of stage 1 and the top prior on this device next to the measured peak.

  Each step is compiled here (this backend's memory_analysis), then run once on real
  zero-filled state, and the device's peak_bytes_in_use read after it; the same steps
  planned on CPU (benchmarks/memory_plan.py, same batch, one device) give the CPU/device
  ratio that calibrates the paper-config table. Runs first, so the peak is its own.
  """
  devices = jax.devices()[:1]
  mesh = memory_plan.make_mesh(devices, 1)
  experiment_arg = ",tiny" if args.small else ""
  out = {"note": "plan = this device's XLA buffer assignment; peak = measured after the step"}
  jobs = (("vqvae", None, args.vqvae_batch), ("prior", "top", args.prior_batch))
  for stage, level, batch in jobs:
    config = memory_plan.load_config(
        "imagenet256", (stage if level is None else f"prior_{level}") + experiment_arg)
    if level and args.prior_layers:
      with config.unlocked():
        config.priors[level].num_layers = args.prior_layers
    step = memory_plan.make_step(config, stage, level, "none")
    compiled, (make_state, shardings), abstract_batch = memory_plan.compile_step(
        step, mesh, 1, config.axis_rules, batch_size=batch, compiler_options=None)
    row = memory_plan.memory_row(compiled)
    state = jax.jit(make_state, out_shardings=shardings)(jax.random.PRNGKey(0))
    inputs = {k: jnp.zeros(a.shape, a.dtype, device=a.sharding)
              for k, a in abstract_batch.items()}
    new_state, metrics = compiled(state, inputs)
    jax.block_until_ready((new_state, metrics))
    name = step.name
    out[name] = {"batch": batch, "plan_bytes": {k: row[k] for k in
                                                ("argument", "output", "alias", "temp", "peak")},
                 "measured_peak_bytes": peak_memory_bytes(devices[0])}
    del state, new_state
  return out


def sampling(args) -> dict:
  """Reference vs incremental sampling time of a 32x32 top and a 64x64 bottom prior."""
  hidden = 32 if args.small else args.sample_hidden
  layers = 2 if args.small else args.sample_layers
  grid_top, grid_bottom = (8, 16) if args.small else (32, 64)
  top = PixelSNAILPrior(num_codes=512, hidden=hidden, res_hidden=hidden, num_layers=layers,
                        attention_every=max(1, layers // 2), num_heads=2 if args.small else 8,
                        kernel_size=5, num_output_layers=1)
  bottom = PixelSNAILPrior(num_codes=512, hidden=hidden, res_hidden=hidden,
                           num_layers=layers, kernel_size=5, num_cond_layers=2,
                           num_cond_levels=1, cond_scales=(2,))
  opts = SimpleNamespace(repeats=1 if args.small else 2, ref_full_max=64,
                         ref_positions=16 if args.small else 64)
  rows = [bench_sampling.bench("top", top, args.sample_batch, grid_top, grid_top, opts),
          bench_sampling.bench("bottom", bottom, args.sample_batch, grid_bottom, grid_bottom,
                               opts)]
  for r in rows:
    r["speedup"] = r["ref"] / r["inc"]
    r["incremental_over_forward"] = r["inc"] / r["fwd"]
  return {r["name"]: r for r in rows}


def paper_sampling(args) -> dict:
  """Incremental samples/s of the paper-size ImageNet-256 priors (Table 3: 32x32 top with
  attention, 64x64 bottom conditioned on it) over a batch sweep, and the projected time of
  50,000 256px samples at the best batch (both levels; decoding is ~1000x cheaper)."""
  config = bench_vqvae.load_config("imagenet256", "sample")
  if args.small:  # CPU smoke test: the same code path at tiny widths and grids
    for level in ("top", "bottom"):
      config.priors[level].update(dict(hidden=16, res_hidden=16, num_layers=2, num_heads=2,
                                       num_output_layers=min(1, config.priors[level]
                                                             .num_output_layers),
                                       num_cond_layers=min(1, config.priors[level]
                                                           .num_cond_layers)))
    config.data.image_size = 64
  size = config.data.image_size
  manifest = {"levels": ["top", "bottom"], "num_codes": config.vqvae.num_codes,
              "shapes": {"top": [size // 8] * 2, "bottom": [size // 4] * 2},
              "num_classes": 1000 if not args.small else 10}
  opts = SimpleNamespace(repeats=1, ref_full_max=0, ref_positions=0)
  out = {"batches": {}}
  for b in ([4] if args.small else args.paper_sample_batches):
    row = {}
    for level in ("top", "bottom"):
      prior = builders.build_prior(config, level, manifest, jnp.bfloat16)
      h, w = manifest["shapes"][level]
      r = bench_sampling.bench(level, prior, b, h, w, opts, reference=False)
      row[level] = {"seconds_per_batch": r["inc"], "forward_passes": r["inc"] / r["fwd"],
                    "params": r["params"]}
    per_image = (row["top"]["seconds_per_batch"] + row["bottom"]["seconds_per_batch"]) / b
    row["samples_per_s"] = 1.0 / per_image
    out["batches"][b] = row
  best = max(out["batches"], key=lambda b: out["batches"][b]["samples_per_s"])
  out["best_batch"] = best
  out["hours_for_50k_samples"] = 50_000 / out["batches"][best]["samples_per_s"] / 3600
  return out


def parse_args(argv=None):
  """Command-line flags (see --help)."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true", help="CPU-sized shapes (tests)")
  ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."),
                                                "accelerator_benchmark.json"))
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--vqvae-batch", type=int, default=32)
  ap.add_argument("--prior-batch", type=int, default=16)
  ap.add_argument("--prior-layers", type=int, default=0, help="0 = the paper's depth")
  ap.add_argument("--sample-batch", type=int, default=8)
  ap.add_argument("--sample-hidden", type=int, default=256)
  ap.add_argument("--sample-layers", type=int, default=10)
  ap.add_argument("--paper-sample-batches", type=lambda s: [int(x) for x in s.split(",")],
                  default=[16, 64, 256], help="batch sweep of the paper-size sampling")
  ap.add_argument("--peak-tflops", type=float, default=None)
  ap.add_argument("--skip", default="", help="comma list of sections to skip")
  args = ap.parse_args(argv)
  if args.small:
    args.steps, args.vqvae_batch, args.prior_batch, args.sample_batch = 2, 8, 8, 8
  return args


def main(argv=None) -> dict:
  """Runs every measurement, writes the JSON file and returns its contents."""
  args = parse_args(argv)
  device = jax.devices()[0]
  peak = peak_tflops(device, args.peak_tflops)
  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device_kind": device.device_kind, "platform": device.platform,
            "num_devices": jax.device_count(), "peak_bf16_tflops": peak,
            "environment": bench_vqvae.environment(), "small": args.small}
  skip = set(filter(None, args.skip.split(",")))
  for name, fn in (("memory", lambda: memory(args)),
                   ("stage1", lambda: stage1(args, peak)), ("priors", lambda: priors(args, peak)),
                   ("sampling", lambda: sampling(args)),
                   ("paper_sampling", lambda: paper_sampling(args))):
    if name in skip:
      continue
    start = time.time()
    try:
      report[name] = fn()
    except Exception as e:  # one failing section (e.g. out of memory) keeps the others
      report[name] = {"error": f"{type(e).__name__}: {e}"}
    report[name + "_wall_s"] = time.time() - start
    print(json.dumps({name: report[name]}, indent=1, default=str), flush=True)
  report["peak_memory_bytes"] = peak_memory_bytes(device)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2, default=str)
  print(f"wrote {args.out}", flush=True)
  return report


if __name__ == "__main__":
  main()
