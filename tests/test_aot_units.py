"""The compile check's pure parts: slice names, loop-aware FLOP counting, worker output."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from vqvae2_jax.aot import flops as flops_lib
from vqvae2_jax.aot import report
from vqvae2_jax.aot import suggest
from vqvae2_jax.aot import topology


@pytest.mark.parametrize("name, generation, dims, chips", [
    ("v4-8", "v4", (2, 2, 1), 4), ("v5p-8", "v5p", (2, 2, 1), 4),
    ("v5e-8", "v5e", (2, 4), 8), ("v5litepod-16", "v5e", (4, 4), 16),
    ("v6e-8", "v6e", (2, 4), 8), ("v5p-128", "v5p", (4, 4, 4), 64),
    ("2xv5e-256", "v5e", (16, 16), 512), ("v5e:2x2", "v5e", (2, 2), 4)])
def test_slice_names_follow_cloud_tpu_types(name, generation, dims, chips):
  s = topology.parse(name)
  assert (s.chip.generation, s.dims, s.chips) == (generation, dims, chips)


@pytest.mark.parametrize("name, words", [("v5e-3", "known sizes"), ("v9-8", "generation"),
                                         ("tpu", "Cloud TPU type"), ("v5p:2x2", "dimensions")])
def test_bad_slice_names_get_one_line(name, words):
  with pytest.raises(topology.TopologyError, match=words) as e:
    topology.parse(name)
  assert "\n" not in str(e.value)


def test_flops_count_scan_lengths_where_xla_counts_bodies_once():
  def f(w, x):
    y = jax.lax.scan(lambda c, wl: (jnp.tanh(c @ wl), None), x, w)[0]
    return jax.lax.conv_general_dilated(y[None, :, :, None], jnp.ones((3, 3, 1, 4)), (1, 1),
                                        "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  w = jnp.zeros((10, 32, 32))
  x = jnp.zeros((8, 32))
  jaxpr = jax.make_jaxpr(f)(w, x)
  matmul = 2 * 8 * 32 * 32
  conv = 2 * (8 * 32 * 4) * (3 * 3 * 1)
  assert flops_lib.count(jaxpr) == 10 * matmul + conv
  assert flops_lib.count(jaxpr, loops_once=True) == matmul + conv
  # Through jit and grad: forward scan 1 matmul per step, backward scan 2 (dx, dw).
  scan_only = lambda w, x: jax.lax.scan(lambda c, wl: (jnp.tanh(c @ wl), None), x, w)[0].sum()
  g = jax.make_jaxpr(jax.jit(jax.grad(scan_only)))(w, x)
  assert flops_lib.count(g) == 10 * 3 * matmul
  assert flops_lib.count(g, loops_once=True) == 3 * matmul


def test_worker_output_gives_rows_or_one_line():
  row = {"program": "train prior_top", "remat": "block", "grad_accum_steps": 2, "fsdp": 1}
  lines = [json.dumps({"event": "start", **row}), json.dumps({"event": "row", **row, "x": 1})]
  rows, failure = report.parse_worker_output("\n".join(lines), "", 0)
  assert rows == [dict(row, x=1)] and failure == ""
  rows, failure = report.parse_worker_output(lines[0], "*** SIGSEGV STACK OVERFLOW ***", -11)
  assert rows == [] and "\n" not in failure
  assert "SIGSEGV" in failure and "stack overflow" in failure and "remat=block" in failure
  oom = json.dumps({"event": "error", **row, "message": "RESOURCE_EXHAUSTED: Ran out of memory"})
  _, failure = report.parse_worker_output(oom, "", 0)
  assert "does not fit" in failure and "--suggest" in failure


def test_suggest_bisects_microbatches_and_prefers_no_remat():
  """A fake compiler where a setting fits iff its per-chip activations (batch / chips /
  accum, halved by remat) are at most 4: no remat fits at 8 microbatches."""
  calls = []

  def compile_fn(args):
    values = dict(a[len("--config."):].split("=") for a in args)
    remat = values["priors.top.train.remat"]
    accum = int(values["priors.top.train.grad_accum_steps"])
    calls.append((remat, accum, int(values["mesh.fsdp"])))
    micro = 256 // 8 // accum * (0.5 if remat == "block" else 1)
    if micro > 4:
      return [], "x does not fit the chip's HBM"
    return [{"program": "train prior_top", "remat": remat, "grad_accum_steps": accum,
             "fsdp": 1, "argument": 0, "temp": 0, "peak": 1, "hbm": 2, "flops": 0,
             "xla_bytes": 0, "xla_optimal_s": 0, "loop_multiplicity": 1, "step_s": 0,
             "compile_s": 0}], ""

  rows, failure = suggest.search(_top_prior_config(), topology.parse("v5e-8"), compile_fn,
                                 log=lambda _: 0)
  assert failure == "" and (rows[0]["remat"], rows[0]["grad_accum_steps"]) == ("none", 8)
  assert calls[:2] == [("none", 1, 1), ("none", 32, 1)] and len(calls) <= 2 + 3  # bisection


GIB = 2**30


def _top_prior_config(batch_size: int = 256):
  class Train:
    pass
  Train.batch_size = batch_size
  return type("C", (), {"stage": "prior_top",
                        "priors": {"top": type("P", (), {"train": Train})}})()


def _fake_compiler(calls: list, fit_check_gib: float | None):
  """A compiler of the top prior's step on 8 chips of 16 GiB: 2 GiB of arguments and
  1 GiB of temporaries per sample per chip. With `fit_check_gib` it refuses, as XLA:TPU
  does, temporaries above that many GiB (its out-of-memory message giving the bytes);
  with None it accepts every setting."""
  def compile_fn(args):
    values = dict(a[len("--config."):].split("=") for a in args)
    accum = int(values["priors.top.train.grad_accum_steps"])
    calls.append(accum)
    temp = 256 // 8 // accum * GIB
    if fit_check_gib is not None and temp + 2 * GIB > fit_check_gib * GIB:
      return [], (f"train prior_top does not fit the chip's HBM: RESOURCE_EXHAUSTED: Ran out "
                  f"of memory on HBM, the total memory required for HLO temporaries "
                  f"({temp / GIB:.2f}G) exceeds available HBM ({fit_check_gib:.2f}G).")
    return [{"program": "train prior_top", "remat": values["priors.top.train.remat"],
             "grad_accum_steps": accum, "fsdp": 1, "argument": 2 * GIB, "output": 0,
             "alias": 0, "temp": temp, "peak": temp + 2 * GIB, "hbm": 16 * GIB,
             "flops": 0, "xla_bytes": 0, "xla_optimal_s": 0, "loop_multiplicity": 1,
             "step_s": 0, "compile_s": 0}], ""
  return compile_fn


def test_suggest_reads_the_compilers_out_of_memory_bytes():
  """The out-of-memory message of the one-microbatch compile predicts 4 microbatches
  (micro 8, 10 GiB in all, fitting 15.5), confirmed by one more compile."""
  calls = []
  rows, failure = suggest.search(_top_prior_config(), topology.parse("v5e-8"),
                                 _fake_compiler(calls, 15.5), log=lambda _: 0)
  assert failure == "" and rows[0]["grad_accum_steps"] == 4
  assert calls == [1, 32, 4]
  assert suggest.parse_out_of_memory(failure) == {}


def test_suggest_rejects_a_compiled_setting_whose_peak_exceeds_the_chip():
  """The compiler accepts every setting here (as XLA:TPU's compile-only check accepted a
  paper prior step at 34.8 GiB on a 32 GiB v4 chip), but arguments plus temporaries of the
  whole batch per chip (2 + 32 GiB) exceed a 16 GiB chip: the search must go on to the
  microbatch count whose peak fits (4: 2 + 8 GiB), found from the compiled temporaries."""
  calls = []
  rows, failure = suggest.search(_top_prior_config(), topology.parse("v5e-8"),
                                 _fake_compiler(calls, None), log=lambda _: 0)
  assert failure == "" and rows[0]["grad_accum_steps"] == 4
  assert rows[0]["peak"] <= rows[0]["available"]
  assert calls == [1, 32, 4]
