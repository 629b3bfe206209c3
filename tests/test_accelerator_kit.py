"""benchmarks/accelerator.py: what the kit computes from its timings, not how fast it is.

The kit's arithmetic (FLOP utilisation, the device peak table, the median of timed calls,
XLA's FLOP count) on known inputs, then one `--small` run on the CPU: the JSON file it
writes, every section's fields, and each derived figure recomputed from the raw ones it
stores beside it. Speed itself is measured in benchmarks/, never asserted here.
"""
import json
import os
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import accelerator  # noqa: E402  pylint: disable=g-import-not-at-top
import bench_vqvae  # noqa: E402  pylint: disable=g-import-not-at-top

SECTIONS = ("memory", "stage1", "priors", "sampling", "paper_sampling")
PEAK_TFLOPS = 2.0  # given on the command line, so the CPU run fills the MFU fields too


def test_utilisation_is_flops_per_second_over_the_peak():
  # 3e12 FLOPs in 0.5 s = 6 TFLOP/s, of a 60 TFLOP/s peak.
  assert accelerator.utilisation(3e12, 0.5, 60.0) == pytest.approx(0.1)
  assert accelerator.utilisation(None, 0.5, 60.0) is None  # no FLOP count
  assert accelerator.utilisation(3e12, 0.5, None) is None  # unknown device


def test_peak_tflops_by_device_kind_and_override():
  kind = lambda name: SimpleNamespace(device_kind=name)
  assert accelerator.peak_tflops(kind("NVIDIA H100 80GB HBM3"), None) == 989.0
  assert accelerator.peak_tflops(kind("TPU v5 lite"), None) == 197.0
  assert accelerator.peak_tflops(kind("TPU v5p"), None) == 459.0
  assert accelerator.peak_tflops(kind("cpu"), None) is None
  assert accelerator.peak_tflops(kind("NVIDIA H100 80GB HBM3"), 123.0) == 123.0


def test_peak_memory_bytes_reads_the_stats_or_gives_none():
  stats = lambda s: SimpleNamespace(memory_stats=lambda: s)
  assert accelerator.peak_memory_bytes(stats({"peak_bytes_in_use": 4096})) == 4096
  assert accelerator.peak_memory_bytes(stats(None)) is None

  def unsupported():
    raise NotImplementedError
  assert accelerator.peak_memory_bytes(SimpleNamespace(memory_stats=unsupported)) is None


def test_timed_is_the_median_of_the_calls_after_the_warm_up(monkeypatch):
  """A scripted clock: each call of fn advances it by the next duration."""
  now, durations = [0.0], iter([100.0, 5.0, 1.0, 3.0])  # the warm-up call takes 100 s

  def fn():
    now[0] += next(durations)
  monkeypatch.setattr(accelerator.time, "perf_counter", lambda: now[0])
  assert accelerator.timed(fn, steps=3, warmup=1) == 3.0


def test_xla_flops_of_a_matmul_is_two_m_k_n():
  compiled = jax.jit(jnp.dot).lower(jnp.zeros((8, 16)), jnp.zeros((16, 4))).compile()
  assert bench_vqvae.xla_flops(compiled) == 2 * 8 * 16 * 4


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
  """(the report main returns, the JSON file it wrote) of one --small run."""
  out = tmp_path_factory.mktemp("accelerator") / "acc.json"
  report = accelerator.main(["--small", "--out", str(out),
                             "--peak-tflops", str(PEAK_TFLOPS)])
  with open(out) as f:
    return report, json.load(f)


def test_the_file_holds_the_report_with_every_section(kit):
  report, written = kit
  assert written == json.loads(json.dumps(report, default=str))
  assert written["small"] is True and written["peak_bf16_tflops"] == PEAK_TFLOPS
  assert written["num_devices"] == jax.device_count() and written["platform"] == "cpu"
  assert {"jax", "flax", "load_avg"} <= set(written["environment"])
  for section in SECTIONS:
    assert "error" not in written[section], written[section]
    assert written[f"{section}_wall_s"] >= 0
  assert "peak_memory_bytes" in written


def _check_rate_and_mfu(row: dict, work: float, rate_key: str, flops_key: str):
  """rate = work per step / step time; MFU = FLOPs per step / step time / the peak."""
  assert row["step_s"] > 0
  assert row[rate_key] == pytest.approx(work / row["step_s"], rel=1e-9)
  assert row[flops_key] > 0
  assert row["mfu"] == pytest.approx(row[flops_key] / row["step_s"] / (PEAK_TFLOPS * 1e12),
                                     rel=1e-9)


def test_stage1_rates_flops_and_mfu(kit):
  stage1 = kit[1]["stage1"]
  assert stage1["params"] > 0 and stage1["image_size"] == 32  # the tiny preset
  for op in ("train", "encode", "decode"):
    _check_rate_and_mfu(stage1[op], stage1["batch"], "images_per_sec", "flops_per_step")
  flops = {op: stage1[op]["flops_per_step"] for op in ("train", "encode", "decode")}
  # A train step holds the forward pass, its backward and Adam: more work than either half.
  assert flops["train"] > flops["encode"] and flops["train"] > flops["decode"]


def test_prior_rates_flops_and_mfu(kit):
  priors = kit[1]["priors"]
  assert set(priors) == {"top", "bottom"}
  for row in priors.values():
    h, w = map(int, row["grid"].split("x"))
    _check_rate_and_mfu(row, row["batch"] * h * w, "latents_per_sec", "flops_per_step")
    assert row["params"] > 0 and {"hidden", "res_hidden"} <= set(row["widths"])
  # The bottom prior's grid is twice the top's on each side.
  assert priors["bottom"]["grid"] == "x".join(
      str(2 * int(s)) for s in priors["top"]["grid"].split("x"))


def test_sampling_ratios_are_recomputed_from_the_stored_times(kit):
  sampling = kit[1]["sampling"]
  assert set(sampling) == {"top", "bottom"}
  for row in sampling.values():
    assert row["fwd"] > 0 and row["inc"] > 0 and row["ref"] > 0
    assert row["speedup"] == pytest.approx(row["ref"] / row["inc"], rel=1e-9)
    assert row["incremental_over_forward"] == pytest.approx(row["inc"] / row["fwd"], rel=1e-9)
    h, w = map(int, row["grid"].split("x"))
    # The reference sampler runs ref_pos positions and is extrapolated to the whole grid.
    assert row["extrapolated"] == (row["ref_pos"] < h * w)


def test_paper_sampling_projection(kit):
  paper = kit[1]["paper_sampling"]
  batches = paper["batches"]
  assert set(batches) == {"4"}  # the --small sweep
  for b, row in batches.items():
    seconds = row["top"]["seconds_per_batch"] + row["bottom"]["seconds_per_batch"]
    assert row["samples_per_s"] == pytest.approx(int(b) / seconds, rel=1e-9)
    for level in ("top", "bottom"):
      assert row[level]["forward_passes"] > 0 and row[level]["params"] > 0
  best = max(batches, key=lambda b: batches[b]["samples_per_s"])
  assert str(paper["best_batch"]) == best
  assert paper["hours_for_50k_samples"] == pytest.approx(
      50_000 / batches[best]["samples_per_s"] / 3600, rel=1e-9)


def test_memory_plan_beside_the_measured_peak(kit):
  memory = kit[1]["memory"]
  for step in ("vqvae", "prior_top"):
    row = memory[step]
    plan = row["plan_bytes"]
    assert set(plan) == {"argument", "output", "alias", "temp", "peak"}
    assert plan["peak"] == plan["argument"] + plan["output"] - plan["alias"] + plan["temp"]
    assert plan["peak"] > 0 and row["batch"] == 8
    # The CPU backend keeps no allocator statistics: the field is there, empty.
    assert "measured_peak_bytes" in row and row["measured_peak_bytes"] is None
