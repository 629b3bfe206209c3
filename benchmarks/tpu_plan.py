r"""The TPU plan: each paper train step on each slice, with the levers `--suggest` picks.

  python benchmarks/tpu_plan.py --topologies=v4-8,v5e-8,v5p-8,v6e-8 \
      --out=benchmarks/results/<date>_tpu_plan

Runs `python -m vqvae2_jax.compile --suggest` (XLA's TPU compiler on this host, libtpu from
the tpu extra) for the seven paper train steps (imagenet256 vqvae / prior_top /
prior_bottom, ffhq1024 vqvae / prior_top / prior_mid / prior_bottom) at the configs'
batches, keeps each JSON, and prints a Markdown table: per-chip peak against HBM, the
step-time lower bound, throughput and MFU bound of the suggested setting, and whether the
step is bound by memory traffic (HBM bytes, loops at their trip counts, / bandwidth >
FLOPs / peak). Steps already in --out are not searched again (the plan resumes); a step
whose bytes were counted by an older walk (`aot/hlo_bytes.py`, WALK_VERSION) is compiled
once more at the levers its search picked, and its row replaced.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vqvae2_jax.aot import hlo_bytes  # noqa: E402
from vqvae2_jax.aot import suggest  # noqa: E402
from vqvae2_jax.aot import topology as topology_lib  # noqa: E402
STEPS = (("imagenet256", "vqvae"), ("imagenet256", "prior_top"), ("imagenet256", "prior_bottom"),
         ("ffhq1024", "vqvae"), ("ffhq1024", "prior_top"), ("ffhq1024", "prior_mid"),
         ("ffhq1024", "prior_bottom"))


def _compile(experiment: str, stage: str, topology: str, path: str, flags: list[str]):
  return subprocess.run(
      [sys.executable, "-m", "vqvae2_jax.compile", f"--config=configs/{experiment}.py:{stage}",
       f"--topology={topology}", f"--json={path}", *flags],
      cwd=ROOT, capture_output=True, text=True, check=False)


def refresh(experiment: str, stage: str, topology: str, path: str, result: dict) -> dict:
  """Compiles a searched step again at its chosen levers, keeping the search's wall time."""
  row = result["rows"][0]
  flags = suggest.overrides(suggest.section_name(stage), row["remat"],
                            row["grad_accum_steps"], row["fsdp"])
  fresh_path = path + ".refresh"
  proc = _compile(experiment, stage, topology, fresh_path, flags)
  if not os.path.exists(fresh_path):
    raise SystemExit(f"{experiment} {stage} on {topology}: compiling its chosen levers "
                     f"again failed: {proc.stderr.strip()[-300:]}")
  with open(fresh_path) as f:
    fresh = json.load(f)
  os.remove(fresh_path)
  if not fresh.get("rows"):
    raise SystemExit(f"{experiment} {stage} on {topology}: compiling its chosen levers "
                     f"again failed: {fresh.get('failure', '')[:300]}")
  result["rows"] = fresh["rows"]
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return result


def run_one(experiment: str, stage: str, topology: str, out_dir: str) -> dict:
  path = os.path.join(out_dir, f"{experiment}_{stage}_{topology}.json")
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    if (result.get("rows")
        and result["rows"][0].get("bytes_walk") != hlo_bytes.WALK_VERSION):
      result = refresh(experiment, stage, topology, path, result)
    return result
  start = time.time()
  proc = _compile(experiment, stage, topology, path, ["--suggest"])
  print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "", flush=True)
  if not os.path.exists(path):  # refused before compiling: keep its one line
    result = {"rows": [], "failure": proc.stderr.strip()[-300:]}
    with open(path, "w") as f:
      json.dump(result, f)
  with open(path) as f:
    result = json.load(f)
  result["wall_s"] = round(time.time() - start, 1)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return result


def table_line(experiment: str, stage: str, topology: str, result: dict) -> str:
  if not result.get("rows"):
    return f"| {experiment} {stage} | {topology} | {result.get('failure', '')[:120]} |||||"
  r = result["rows"][0]
  bound = r.get("bound", "")
  per_s = r.get("per_s_per_chip", 0.0)
  unit = "img/s" if r["unit"] == "images" else "latents/s"
  return (f"| {experiment} {stage} | {topology} | remat={r['remat']}, "
          f"accum={r['grad_accum_steps']}, fsdp={r['fsdp']} | {r['peak'] / 1e9:.1f} / "
          f"{r['hbm'] / 2**30:.0f} GiB | {1e3 * r['step_s']:.0f} ms | {per_s:,.0f} {unit} | "
          f"{100 * r.get('mfu_bound', 0):.0f}% ({bound}) |")


def _grid_cell(r: dict, chip) -> str:
  """'levers: peak / HBM, MFU <= x%' of one row, the bounds from its raw figures as
  aot/analysis.py defines them today; a row whose bytes an older walk counted says so."""
  moved = r["bytes"] if r.get("bytes_walk") == hlo_bytes.WALK_VERSION else None
  compute = r["flops"] / chip.peak_bf16_flops
  step = max(compute, r["xla_optimal_s"], (moved or 0.0) / chip.hbm_bytes_per_s)
  mfu = r["model_flops"] / (step * chip.peak_bf16_flops)
  levers = ("remat" if r["remat"] == "block" else "no remat") + (
      f", accum {r['grad_accum_steps']}" if r["grad_accum_steps"] > 1 else "") + (
      f", fsdp {r['fsdp']}" if r["fsdp"] > 1 else "")
  bound = ("bytes not counted" if moved is None else
           "memory-bound" if step > compute else "compute-bound")
  return (f"{levers}: {r['peak'] / 2**30:.1f} / {r['hbm'] / 2**30:.0f} GiB, "
          f"MFU <= {100 * mfu:.0f}% ({bound})")


def grid(out_dir: str, topologies: list[str]) -> str:
  """A Markdown grid (steps x slices) of what `out_dir` holds: the --suggest result of each
  cell, else the hand-set remat='block' compile (*_remat-block.json, marked *), else '-'."""
  lines = ["| step | " + " | ".join(topologies) + " |",
           "|---|" + "---|" * len(topologies)]
  for experiment, stage in STEPS:
    cells = []
    for topology in topologies:
      cell = "-"
      for suffix, mark in (("", ""), ("_remat-block", "*")):
        path = os.path.join(out_dir, f"{experiment}_{stage}_{topology}{suffix}.json")
        if not os.path.exists(path):
          continue
        with open(path) as f:
          rows = json.load(f).get("rows")
        if rows:
          cell = _grid_cell(rows[0], topology_lib.parse(topology).chip) + mark
          break
      cells.append(cell)
    lines.append(f"| {experiment} {stage} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--topologies", default="v4-8,v5e-8,v5p-8,v6e-8")
  ap.add_argument("--steps", default="all", help="comma list of experiment:stage")
  ap.add_argument("--out", required=True, help="folder for one JSON per step and slice")
  ap.add_argument("--grid", action="store_true",
                  help="print the grid of what --out holds, compiling nothing")
  args = ap.parse_args(argv)
  if args.grid:
    print(grid(args.out, args.topologies.split(",")))
    return
  os.makedirs(args.out, exist_ok=True)
  steps = STEPS if args.steps == "all" else [tuple(s.split(":")) for s in args.steps.split(",")]
  lines = ["| step | slice | suggested levers | peak / HBM per chip | step >= | per chip | "
           "MFU <= |", "|---|---|---|---|---|---|---|"]
  for experiment, stage in steps:
    for topology in args.topologies.split(","):
      result = run_one(experiment, stage, topology, args.out)
      lines.append(table_line(experiment, stage, topology, result))
      print(lines[-1], flush=True)
  with open(os.path.join(args.out, "plan.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
