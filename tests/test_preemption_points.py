"""SIGTERM at every safe point of a training stage (`fault_injection.SIGTERM_POINTS`): during
the first compile, at step 1, on a save step, on the last step, while pictures are written
and during evaluation. Each preempted run exits 0 with the preemption line and saves the
step it reached; the rerun of the same command finishes with the final checkpoint of an
uninterrupted run (equal array checksums, which are bit-exact).

The preempted runs are the real command line (a subprocess through the fault driver); the
reruns and the one uninterrupted reference run in this process, which is faster.
"""
import os
import subprocess
import sys

import pytest

from vqvae2_jax.runner import run_stage

from fault_injection import SIGTERM_POINTS, final_checksums, preempted_cleanly
from helpers import ROOT, load_config

pytestmark = pytest.mark.xdist_group("preemption_points")

# The tiny demo: 4 steps, a checkpoint every 2, evaluation and pictures after step 4.
STAGE, FINAL_STEP = "vqvae", 4


def _config():
  config = load_config("demo", f"{STAGE},tiny")
  assert (config.vqvae_train.steps, config.vqvae_train.checkpoint_every) == (FINAL_STEP, 2)
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The final checkpoint's checksums of an uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  run_stage(_config(), workdir)
  return final_checksums(workdir, STAGE, FINAL_STEP)


@pytest.mark.parametrize("point", list(SIGTERM_POINTS))
def test_sigterm_at_a_safe_point_exits_0_and_the_rerun_ends_bit_exact(point, reference,
                                                                     tmp_path, capsys):
  fault = SIGTERM_POINTS[point]
  saved = int(fault.split(":")[1])  # every point saves the step it is at
  env = dict(os.environ, FAULT=fault)
  first = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fault_injection.py"),
                          f"--config=configs/demo.py:{STAGE},tiny", f"--workdir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert preempted_cleanly(first.returncode, first.stdout, STAGE), first.stderr[-3000:]
  assert f"[{STAGE}] preempted: saved step {saved};" in first.stdout, first.stdout[-2000:]
  assert f"[{STAGE}] done" not in first.stdout and "Traceback" not in first.stderr

  capsys.readouterr()
  run_stage(_config(), str(tmp_path))
  out = capsys.readouterr().out
  assert f"[{STAGE}] resumed from step {saved}" in out and f"[{STAGE}] done" in out, out
  assert final_checksums(str(tmp_path), STAGE, FINAL_STEP) == reference
  assert os.path.exists(os.path.join(tmp_path, STAGE, "reconstructions.png"))
