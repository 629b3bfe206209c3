"""Compile a `Program` for a device set and turn the compiler's figures into bounds.

Per chip, from the compiled executable: argument, output, alias and temporary bytes
(`memory_analysis`) and peak = argument + output - alias + temporaries, against the
chip's HBM; from `cost_analysis`: FLOPs, bytes accessed and `optimal_seconds`, the TPU
compiler's roofline time (per op the larger of its compute and its memory time).

XLA counts a loop body once, so with a scanned layer stack, gradient accumulation or the
sampler's loops those three figures cover a fraction of a call. `aot.flops` counts the
traced program's matmul and convolution FLOPs with every scan at its length (exact for
the MXU work; and with each body once: their ratio is the loop multiplicity shown);
model FLOPs are those of the same program without rematerialisation. `aot.hlo_bytes`
walks the compiled HLO with every while body at its trip count: the call's HBM bytes
(on-chip buffers excluded) and which ops move them (`bytes_by_op`). Every figure below
is a lower bound of the call's time on the chip, so the bounds hold:

  step-time lower bound = max(FLOPs / peak, the compiler's roofline time,
                              bytes with loops / HBM bandwidth)
  examples / s / chip   <= examples per call / chips / step-time bound
  MFU bound             = model FLOPs / (step-time bound x chip peak bf16 FLOP/s)

`bound` says which term sets the step-time bound: 'compute' (the matmuls at peak) or
'memory' (the compiler's roofline, with loop bodies once, exceeds it: memory-bound work
such as the optimizer update and element-wise passes is that large).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import jax
from jax._src import compilation_cache  # reset_cache: see _without_persistent_cache
from jax._src import config as jax_config

from vqvae2_jax.aot import flops as flops_lib
from vqvae2_jax.aot import hlo_bytes
from vqvae2_jax.aot.programs import Program
from vqvae2_jax.aot.topology import Chip


@contextlib.contextmanager
def _without_persistent_cache():
  """Compile-only devices cannot load an executable back, so theirs stay out of any
  persistent compilation cache. JAX decides once per process whether the cache is used:
  the decision is reset around the compile (private API; no public switch exists)."""
  with jax_config.enable_compilation_cache(False):
    compilation_cache.reset_cache()
    try:
      yield
    finally:
      compilation_cache.reset_cache()


def _trace_flops(fn, args, context) -> tuple[float, float]:
  with context():
    jaxpr = jax.make_jaxpr(fn)(*args)
  return flops_lib.count(jaxpr), flops_lib.count(jaxpr, loops_once=True)


def memory_figures(compiled) -> dict[str, int]:
  """Per-chip bytes of a compiled program and its peak."""
  m = compiled.memory_analysis()
  row = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
         "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
  row["peak"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
  return row


def analyse(program: Program, chip: Chip, num_chips: int) -> dict[str, Any]:
  """Compiles `program` and returns its per-chip figures (see the module docstring).

  Raises whatever the compiler raises (e.g. RESOURCE_EXHAUSTED when it does not fit).
  """
  row: dict[str, Any] = {"program": program.name, "unit": program.unit,
                         "examples": program.examples, **program.levers}
  start = time.time()
  with program.context():
    lowered = program.jitted.lower(*program.args)
  with _without_persistent_cache():
    compiled = lowered.compile()
  row["compile_s"] = round(time.time() - start, 1)
  row.update(memory_figures(compiled))
  row["hbm"] = chip.hbm_bytes
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row["xla_flops"] = float(cost.get("flops", 0.0))
  row["xla_bytes"] = float(cost.get("bytes accessed", 0.0))
  row["xla_optimal_s"] = float(cost.get("optimal_seconds", 0.0))
  module = hlo_bytes.ModuleBytes(compiled.as_text())
  row["bytes"] = module.total(loops=True)
  row["bytes_loop_factor"] = row["bytes"] / max(module.total(loops=False), 1.0)
  # Every memory space, bodies once: XLA's convention, to compare with its count.
  row["hlo_bytes_once"] = module.every_memory().total(loops=False)
  row["bytes_by_op"] = module.top_movers()
  row["bytes_walk"] = hlo_bytes.WALK_VERSION

  true_flops, once_flops = _trace_flops(getattr(program.jitted, "__wrapped__",
                                                program.jitted), program.args,
                                        program.context)
  model_flops = (true_flops if program.model_fn is None
                 else _trace_flops(program.model_fn, program.args, program.context)[0])
  row["loop_multiplicity"] = true_flops / once_flops if once_flops else 1.0
  row["flops"] = true_flops / num_chips
  row["model_flops"] = model_flops / num_chips
  row["compute_s"] = row["flops"] / chip.peak_bf16_flops
  row["memory_s"] = row["bytes"] / chip.hbm_bytes_per_s
  row["step_s"] = max(row["compute_s"], row["xla_optimal_s"], row["memory_s"])
  row["bound"] = "compute" if row["step_s"] == row["compute_s"] else "memory"
  if row["step_s"] > 0:
    row["per_s_per_chip"] = program.examples / num_chips / row["step_s"]
    row["mfu_bound"] = row["model_flops"] / (row["step_s"] * chip.peak_bf16_flops)
  return row
