"""XLA's TPU compiler on this CPU host (libtpu, no TPU): the tiny configs' programs
compile for a v5e slice, their figures are consistent, and the CLI reports per chip.

Skips only where libtpu is not installed (`pip install -e '.[tpu]'`; CI installs it).
libtpu holds a process lock: every test here runs on one xdist worker, and any other
process that loads it (the CLI's compile workers) is allowed to.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu is not installed (pip install -e '.[tpu]')"),
    pytest.mark.xdist_group("tpu"),
]

from vqvae2_jax.aot import analysis  # noqa: E402
from vqvae2_jax.aot import programs as programs_lib  # noqa: E402
from vqvae2_jax.aot import topology  # noqa: E402

from helpers import ROOT, load_config  # noqa: E402

SLICE = "v5e-4"


@pytest.fixture(scope="module")
def devices():
  return topology.slice_devices(SLICE)


def _analyse(config, stage, devices):
  chip = topology.parse(SLICE).chip
  programs = programs_lib.stage_programs(config, stage, devices, num_classes=4)
  rows = [analysis.analyse(p, chip, len(devices)) for p in programs]
  for row in rows:
    assert row["peak"] == row["argument"] + row["output"] - row["alias"] + row["temp"]
    # The HLO walk sees the program XLA costed: counting every memory space with loop
    # bodies once, as XLA does, it is within 2x of XLA's bytes accessed (which charges an
    # asynchronous copy three times); counting loops at their trips never lowers it.
    assert 0.5 < row["hlo_bytes_once"] / row["xla_bytes"] < 2
    assert row["bytes_loop_factor"] >= 1 and row["memory_s"] > 0
    shares = [share for _, share in row["bytes_by_op"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert 0 < row["peak"] < row["hbm"]
    assert row["flops"] > 0 and row["step_s"] > 0 and row["per_s_per_chip"] > 0
  return rows


@pytest.mark.parametrize("remat", ["none", "block"])
def test_tiny_prior_train_step_compiles_for_tpu(devices, remat):
  # Scanned stacks, as the paper configs run them on TPU (the CPU demo's are unrolled).
  config = load_config("demo", "prior_top,tiny", **{"priors.top.train.remat": remat,
                                                    "priors.top.train.batch_size": 8,
                                                    "priors.top.scan_layers": True})
  (row,) = _analyse(config, "prior_top", devices)
  assert row["remat"] == remat and row["program"] == "train prior_top"
  # Layers run under scan: XLA counts the body once, the jaxpr count knows the length.
  assert row["loop_multiplicity"] > 1
  # ... and its bytes too: the two scanned stacks move more than one layer's worth.
  assert row["bytes_loop_factor"] > 1
  # Rematerialisation recomputes the forward pass: more FLOPs than the model's.
  assert (row["flops"] > row["model_flops"]) == (remat == "block")


def test_tiny_stage_one_encoder_and_samplers_compile_for_tpu(devices):
  config = load_config("demo", "pipeline,tiny", **{"vqvae_train.batch_size": 8,
                                                   "priors.top.train.batch_size": 8,
                                                   "priors.bottom.train.batch_size": 8})
  rows = _analyse(config, "vqvae", devices)
  rows += _analyse(config, "extract", devices)
  rows += _analyse(config, "sample", devices)
  assert [r["program"] for r in rows] == ["train vqvae", "encoder", "sampler top",
                                          "sampler bottom"]
  # The sampler loops over rows and positions: XLA's count sees each body once.
  assert all(r["loop_multiplicity"] > 1 for r in rows[2:])
  assert all(r["bytes_loop_factor"] > 2 for r in rows[2:])
  # Stage 1 and the encoder run no loop: their bytes are XLA's, exactly.
  assert [r["bytes_loop_factor"] for r in rows[:2]] == [1.0, 1.0]


def _cli(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vqvae2_jax.compile", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_compile_cli_prints_the_table_and_fails_in_one_line():
  ok = _cli("--config=configs/demo.py:prior_bottom,tiny", f"--topology={SLICE}",
            "--config.priors.bottom.train.batch_size=8")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "train prior_bottom" in ok.stdout and "MFU<=" in ok.stdout
  assert "HBM bytes of train prior_bottom by op: " in ok.stdout
  bad = _cli("--config=configs/demo.py:prior_bottom,tiny", f"--topology={SLICE}",
             "--config.mesh.fsdp=3")
  assert bad.returncode == 1
  assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
  assert "fsdp=3" in bad.stderr
  unknown = _cli("--config=configs/demo.py:prior_bottom,tiny", "--topology=v5e-3")
  assert unknown.returncode == 1 and "known sizes" in unknown.stderr


def test_paper_width_remat_attention_prior_compiles_at_the_default_stack():
  """The ImageNet top prior's attention layer (512 wide, 8 heads, 32x32 codes) with
  remat='block': recomputing its softmax in the backward pass crashed XLA:TPU (a stack
  overflow in convolution fusion costing). The compile runs in the CLI's child process,
  so a crash fails this test instead of the test run."""
  prior = "--config.priors.top."
  run = _cli("--config=configs/imagenet256.py:prior_top", f"--topology={SLICE}",
             f"{prior}num_layers=1", f"{prior}attention_every=1", f"{prior}num_output_layers=0",
             f"{prior}train.remat=block", f"{prior}train.batch_size=4")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "train prior_top" in run.stdout
