"""Where a stage-1 train step (or encode / decode) spends its time, by layer, pass and op kind.

Compiles the real train step (`--op train`, or the jitted encode / decode) of
`bench_vqvae.py` (same flags: `--match-torch-reference`,
`--image-size`, `--batch`, `--upsample`), runs it under `jax.profiler`, and sums the
duration of every XLA:CPU thunk of the step by the HLO instruction it ran. Each instruction
is attributed through its HLO metadata: the Flax module path (layer), forward or backward
(`transpose(jvp(...))` in the op name), and its kind (convolution run by YNNPACK or by
XLA's own Eigen emitter, matmul, the concatenation that builds im2col patches, copies /
transposes, other loop fusions). `--torch` adds torch.profiler's table of the PyTorch
reference's aten ops for the same step, grouped by op and input shape.

  python benchmarks/profile_stage1.py --match-torch-reference --image-size 256 --batch 16 \
      --upsample transpose --steps 2 --torch

Thunks can run concurrently on the CPU's threads, so the summed thunk time may exceed the
wall time of a step; the shares are of the summed time. XLA's own (Eigen) convolutions
run asynchronously: their thunks record almost nothing and their time is reported as the
executor's wait for asynchronous thunks, not per layer (time them alone instead).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vqvae  # noqa: E402  pylint: disable=g-import-not-at-top

_INSTRUCTION = re.compile(r"^\s*%?([\w.\-]+) = (\(.*?\)|\S+?)(?:\{[^}]*\})? ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
  """name -> {shape, opcode, op_name, ynn} for every instruction of an HLO module's text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    op = _OP_NAME.search(line)
    out[name] = dict(shape=shape, opcode=opcode, op_name=op.group(1) if op else "",
                     ynn="__ynn_fusion" in line)
  return out


def classify(inst: dict[str, str]) -> tuple[str, str, str]:
  """(layer, pass, kind) of one HLO instruction from its metadata.

  layer: the Flax module path ('decoder/Conv_0'); pass: 'fwd' | 'bwd';
  kind: 'conv ynn' | 'conv xla' | 'matmul' | 'im2col patches' | 'copy' | 'other'.
  """
  op_name = inst["op_name"]
  pass_ = "bwd" if "transpose(" in op_name else "fwd"
  parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "jvp(",
                                                                     "transpose("))]
  last = parts[-1] if parts else ""
  # Module path only: drop the primitive, einsum specs and method names ('VQVAE2._encode',
  # 'ResidualStack_0.block'), and the top module.
  modules = []
  for p in parts[:-1]:
    p = p.split(".")[0]
    if "->" not in p and p != "VQVAE2" and (not modules or modules[-1] != p):
      modules.append(p)
  layer = "/".join(modules) or "(step)"
  opcode = inst["opcode"]
  if opcode == "convolution":
    kind = "conv xla"
  elif inst["ynn"]:
    kind = "conv ynn" if "conv" in last else "matmul"
  elif opcode == "dot" or "dot_general" in last:
    kind = "matmul"
  elif opcode == "concatenate" or last == "concatenate":
    kind = "im2col patches"  # the concatenation or its transposed copy
  elif opcode in ("copy", "transpose") or "copy" in op_name or "transpose" in last:
    kind = "copy"
  else:
    kind = "other"
  return layer, pass_, kind


_WAIT = "ThunkExecutor::Execute (wait for completion)"


def thunk_times(trace_dir: str, module_prefix: str) -> collections.Counter:
  """Summed microseconds per HLO instruction of modules named `module_prefix*`, and under
  the key `_WAIT` the executor's waits for asynchronous thunks: XLA's own (Eigen)
  convolutions return at once and run on the Eigen pool, so their thunk events are
  ~0.1 ms and their time shows up only as that wait."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no perfetto trace under {trace_dir}")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  times = collections.Counter()
  for e in events:
    a = e.get("args") or {}
    if e.get("ph") == "X" and "hlo_op" in a and a.get("hlo_module", "").startswith(
        module_prefix):
      times[a["hlo_op"]] += e.get("dur", 0.0)
    elif e.get("ph") == "X" and e.get("name") == _WAIT:
      times[_WAIT] += e.get("dur", 0.0)
  return times


# The jitted function behind each op of bench_vqvae's variants (its HLO module's name).
_MODULES = dict(train="jit_step", encode="jit_encode", decode="jit_decode")


def profile_jax(variant, op: str, steps: int) -> tuple[collections.Counter, dict, float]:
  """(microseconds per instruction summed over `steps` calls of `op`, HLO instructions,
  wall seconds per call)."""
  run = getattr(variant, op)
  run()  # warm
  insts = hlo_instructions(getattr(variant, f"_{op}").as_text())
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(steps):
      run()
    wall = (time.perf_counter() - t) / steps
    jax.profiler.stop_trace()
    times = thunk_times(d, _MODULES[op])
  return times, insts, wall


def print_jax_profile(times, insts, wall: float, steps: int, top: int, op: str) -> None:
  """Tables by kind x pass, by layer x pass, and the `top` slowest instructions."""
  wait = times.pop(_WAIT, 0.0) / steps / 1e3
  total = sum(times.values()) / steps / 1e3
  by_kind, by_layer = collections.Counter(), collections.Counter()
  rows = []
  for name, us in times.items():
    inst = insts.get(name, dict(shape="?", opcode="?", op_name="", ynn=False))
    layer, pass_, kind = classify(inst)
    ms = us / steps / 1e3
    by_kind[kind, pass_] += ms
    by_layer[layer, pass_] += ms
    rows.append((ms, name, inst["shape"], kind, pass_, layer))
  print(f"\nJAX {op}: wall {wall * 1e3:.0f} ms/call, summed thunks {total:.0f} ms/call, "
        f"waits for asynchronous thunks {wait:.0f} ms/call (XLA's own convolutions: their "
        "time is there, not under 'conv xla')")
  print(f"{'kind':<15}{'fwd ms':>9}{'bwd ms':>9}{'share':>8}")
  for kind in sorted({k for k, _ in by_kind}, key=lambda k: -(by_kind[k, "fwd"]
                                                             + by_kind[k, "bwd"])):
    f, b = by_kind[kind, "fwd"], by_kind[kind, "bwd"]
    print(f"{kind:<15}{f:9.1f}{b:9.1f}{(f + b) / total:8.1%}")
  print(f"\n{'layer':<58}{'fwd ms':>9}{'bwd ms':>9}{'share':>8}")
  for layer in sorted({l for l, _ in by_layer}, key=lambda l: -(by_layer[l, "fwd"]
                                                                + by_layer[l, "bwd"])):
    f, b = by_layer[layer, "fwd"], by_layer[layer, "bwd"]
    if f + b >= 0.005 * total:
      print(f"{layer[-58:]:<58}{f:9.1f}{b:9.1f}{(f + b) / total:8.1%}")
  print(f"\ntop {top} instructions (ms/step):")
  for ms, name, shape, kind, pass_, layer in sorted(rows, reverse=True)[:top]:
    print(f"{ms:8.1f}  {kind:<14}{pass_:<4} {shape:<24} {name:<28} {layer[-50:]}")


def profile_torch(variant, op: str, steps: int, top: int) -> None:
  """torch.profiler's aten op table of `steps` calls of the reference's `op`."""
  from torch import profiler  # pylint: disable=g-import-not-at-top
  run = getattr(variant, op)
  run()
  t = time.perf_counter()
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU],
                        record_shapes=True) as prof:
    for _ in range(steps):
      run()
  wall = (time.perf_counter() - t) / steps
  print(f"\n{variant.name} {op}: wall {wall * 1e3:.0f} ms/call (profiled)")
  print(prof.key_averages(group_by_input_shape=True).table(
      sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def main(argv=None) -> None:
  """Profiles the JAX train step (and the PyTorch reference's with --torch)."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--match-torch-reference", action="store_true")
  ap.add_argument("--experiment", default="demo")
  ap.add_argument("--image-size", type=int, default=None)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--upsample", default="transpose", help="one JAX upsampling mode")
  ap.add_argument("--op", default="train", choices=tuple(_MODULES))
  ap.add_argument("--steps", type=int, default=2, help="profiled calls (after one warm-up)")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--torch", action="store_true", help="also profile the PyTorch reference")
  args = ap.parse_args(argv)
  bench_argv = ["--experiment", args.experiment, "--upsample", args.upsample,
                "--ops", args.op]
  for flag, value in (("--image-size", args.image_size), ("--batch", args.batch)):
    if value is not None:
      bench_argv += [flag, str(value)]
  if args.match_torch_reference:
    bench_argv.append("--match-torch-reference")
  if args.torch:
    bench_argv.append("--torch")
  variants, setup = bench_vqvae.build_variants(bench_vqvae.parse_args(bench_argv), [args.op])
  print(f"stage 1 {setup['experiment']}, {setup['image_size']}x{setup['image_size']}, batch "
        f"{setup['batch']}, {args.upsample}; widths {setup['widths']}; load "
        f"{tuple(round(x, 2) for x in os.getloadavg())}")
  for v in variants:
    if v.framework == "jax":
      print_jax_profile(*profile_jax(v, args.op, args.steps), args.steps, args.top, args.op)
    else:
      profile_torch(v, args.op, args.steps, args.top)
  print(f"load average at end: {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
