"""The compile check's table, and the reading of its worker's output (rows or one line)."""
from __future__ import annotations

import json
import signal

from vqvae2_jax.aot.topology import Slice

LEVER_KEYS = ("remat", "grad_accum_steps", "fsdp")
COLUMNS = (f"{'program':<18} {'remat':<5} {'accum':>5} {'fsdp':>4} {'arg_GB':>7} "
           f"{'temp_GB':>7} {'peak_GB':>7} {'HBM%':>5} {'TFLOP':>9} {'GB_acc':>8} "
           f"{'opt_ms1':>8} {'loops':>6} {'step_ms>=':>9} {'per_s/chip<=':>13} {'MFU<=':>6} "
           f"{'bound':<7} {'compile_s':>9}")


def header(stage: str, slice_: Slice) -> str:
  """Title lines: the stage, the slice and what the columns mean."""
  c = slice_.chip
  return (f"stage {stage} on {slice_.name}: {slice_.chips} x {c.generation} chips "
          f"({c.hbm_bytes / 2**30:.0f} GiB HBM, {c.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s, "
          f"{c.hbm_bytes_per_s / 1e9:.0f} GB/s each); per chip, from XLA's TPU compiler.\n"
          "TFLOP: matmul work of one call, loops at their length, recomputation included; "
          "GB_acc: HBM bytes of the compiled program, loops at their trip counts; opt_ms1: "
          "the compiler's roofline time, loop bodies once; loops: the multiplicity of the "
          "matmul FLOPs; step_ms>= max(TFLOP / peak, opt_ms1, GB_acc / bandwidth); MFU<= "
          "model FLOPs / (step_ms x peak).\n" + COLUMNS)


def _optimal_ms(seconds: float) -> str:
  # XLA:TPU reports a negative roofline time for some large programs (seen on the paper
  # priors): not a time, so it is shown as n/a (and max() in the bound ignores it).
  return f"{1e3 * seconds:8.2f}" if seconds >= 0 else f"{'n/a':>8}"


def format_row(r: dict) -> str:
  """One table line of an `analysis.analyse` row."""
  gb = lambda x: f"{x / 1e9:7.2f}"
  unit = "img" if r.get("unit") == "images" else "lat"
  per_s = r.get("per_s_per_chip", 0.0)
  levers = (f"{r.get('remat', '-'):<5} {r.get('grad_accum_steps', '-'):>5} "
            f"{r.get('fsdp', '-'):>4}")
  return (f"{r['program']:<18} {levers} {gb(r['argument'])} {gb(r['temp'])} "
          f"{gb(r['peak'])} {100 * r['peak'] / r['hbm']:5.0f} {r['flops'] / 1e12:9.3f} "
          f"{r.get('bytes', r['xla_bytes']) / 1e9:8.2f} {_optimal_ms(r['xla_optimal_s'])} "
          f"{r['loop_multiplicity']:6.1f} {1e3 * r['step_s']:9.2f} "
          f"{per_s:10.1f}{unit:>3} {100 * r.get('mfu_bound', 0.0):5.1f}% {r.get('bound', ''):<7} "
          f"{r['compile_s']:9.1f}")


def format_movers(r: dict, count: int = 6) -> str:
  """Which ops move the HBM bytes of a row (loops at their trip counts), one line."""
  movers = r.get("bytes_by_op") or []
  parts = [f"{100 * share:.0f}% {label}" for label, share in movers[:count]]
  return f"  HBM bytes of {r['program']} by op: " + ", ".join(parts) if parts else ""


def describe_levers(event: dict) -> str:
  levers = [f"{k}={event[k]}" for k in LEVER_KEYS if k in event]
  return f" ({', '.join(levers)})" if levers else ""


def _error_line(event: dict) -> str:
  message = event.get("message", "")
  what = f"{event.get('program', '?')}{describe_levers(event)}"
  if "RESOURCE_EXHAUSTED" in message or "Ran out of memory" in message:
    return (f"{what} does not fit the chip's HBM: {message} (try --suggest, or remat / "
            "grad_accum_steps / mesh.fsdp)")
  return f"{what} did not compile: {message}"


def parse_worker_output(stdout: str, stderr: str, returncode: int) -> tuple[list[dict], str]:
  """(rows, failure) from a compile worker's JSON lines and exit status."""
  rows, failures, started = [], [], None
  for line in stdout.splitlines():
    if not line.startswith("{"):
      continue
    try:
      event = json.loads(line)
    except json.JSONDecodeError:
      continue
    kind = event.pop("event", "")
    if kind == "start":
      started = event
    elif kind == "row":
      rows.append(event)
      started = None
    elif kind == "error":
      failures.append(_error_line(event))
      started = None
  if returncode != 0:
    if returncode < 0:
      try:
        how = signal.Signals(-returncode).name
      except ValueError:
        how = f"signal {-returncode}"
    else:
      how = f"exit status {returncode}"
    if "STACK OVERFLOW" in stderr.upper():
      how += ", a stack overflow inside the compiler"
    what = (f"{started['program']}{describe_levers(started)}" if started
            else "the compile worker")
    tail = " ".join(stderr.strip().splitlines()[-1:])[:200] if returncode > 0 else ""
    failures.append(f"the TPU compiler crashed ({how}) compiling {what}"
                    + (f": {tail}" if tail else ""))
  return rows, "; ".join(failures)
