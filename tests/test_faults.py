"""Faults a training run must survive, on the tiny demo: preemption (SIGTERM) on a checkpoint
step and during evaluation, kill -9 inside a save, divergence, corrupt checkpoint arrays,
and bad command lines. Faults are injected by tests/fault_injection.py around unmodified
code; "survived" means the rerun of the same command finishes with the state an
undisturbed history reaches (equal array checksums, which are bit-exact). SIGTERM at each
other safe point: tests/test_preemption_points.py; failed (not corrupt) checkpoint reads:
tests/test_restore_failures.py.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import parallel
from vqvae2_jax.runner import run_stage
from vqvae2_jax.stages import vqvae_stage
from vqvae2_jax.train import loop
from vqvae2_jax.train import state as state_lib
from vqvae2_jax.workdir import Workdir

from helpers import ROOT, load_config

# The tests share one preempted-and-resumed workdir (copied before they change it).
pytestmark = pytest.mark.xdist_group("faults")

STAGE = "--config=configs/demo.py:vqvae,tiny"
# Four steps, a checkpoint at every one (keep 3), pictures and evaluation at step 4.
EVERY_STEP = "--config.vqvae_train.checkpoint_every=1"
DRIVER = os.path.join(ROOT, "tests", "fault_injection.py")


def run_cli(workdir, *args, fault=None, driver=True, env=None):
  env = dict(os.environ, **(env or {}))
  env.pop("FAULT", None)
  if fault:
    env["FAULT"] = fault
  entry = [DRIVER] if driver else ["-m", "vqvae2_jax.main"]
  return subprocess.run([sys.executable, *entry, *args, f"--workdir={workdir}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def checkpoints(workdir):
  return Workdir(str(workdir)).checkpoint_dir("vqvae")


def record(workdir, step):
  c = ckpt_lib.Checkpointer(checkpoints(workdir), keep=None)
  try:
    return c.read_record(step)
  finally:
    c.close()


def assert_one_line_error(result, *fragments):
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """SIGTERM on checkpoint step 2, then SIGTERM inside the final evaluation, then a rerun
  that finishes: (workdir, [the three CompletedProcesses], record of step 4 after run 2)."""
  workdir = tmp_path_factory.mktemp("preempted")
  first = run_cli(workdir, STAGE, EVERY_STEP, fault="sigterm_step:2")
  second = run_cli(workdir, STAGE, EVERY_STEP, fault="sigterm_evaluate:4")
  pending = record(workdir, 4)["pending"]
  # Unset JAX_PLATFORMS: an ordinary start, where JAX probes for a TPU.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  third = subprocess.run([sys.executable, "-m", "vqvae2_jax.main", STAGE, EVERY_STEP,
                          f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
  return workdir, (first, second, third), pending


def test_sigterm_on_a_checkpoint_step_and_during_evaluation(preempted):
  workdir, (first, second, third), pending = preempted
  # A checkpoint step: saved once (not twice: orbax's StepAlreadyExistsError), exit 0.
  assert first.returncode == 0, first.stderr[-3000:]
  assert "[vqvae] preempted: saved step 2" in first.stdout
  # During the final evaluation: the pictures still due are recorded, exit 0.
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from step 2" in second.stdout
  assert "[vqvae] preempted: saved step 4" in second.stdout and "done" not in second.stdout
  assert pending == ["pictures"]
  # The rerun finishes: runs the pending pictures, the stage completes.
  assert third.returncode == 0, third.stderr[-3000:]
  assert "resumed from step 4" in third.stdout and "[vqvae] done" in third.stdout
  assert os.path.exists(os.path.join(workdir, "vqvae", "reconstructions.png"))
  rows = [json.loads(l) for l in open(os.path.join(workdir, "vqvae", "metrics.jsonl"))]
  assert [(r["step"], r["split"]) for r in rows] == [(2, "train"), (4, "train"), (4, "val")]
  for result in (first, second, third):
    assert "Traceback" not in result.stderr
  # An ordinary run prints neither JAX's TPU probe nor orbax's handler-override warning.
  assert "Unable to initialize backend" not in third.stderr
  assert "Type handler registry" not in third.stderr


def test_kill_9_during_a_save_resumes_from_the_previous_complete_step(preempted, tmp_path):
  killed = run_cli(tmp_path, STAGE, EVERY_STEP, fault="sigkill_save:3")
  assert killed.returncode == -9
  assert any(".orbax-checkpoint-tmp" in n for n in os.listdir(checkpoints(tmp_path)))
  assert Workdir(str(tmp_path)).checkpoint_steps("vqvae") == [1, 2]
  rerun = run_cli(tmp_path, STAGE, EVERY_STEP)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step 2" in rerun.stdout
  # Bit-exact: the same final state as the preempted history.
  assert record(tmp_path, 4)["checksums"] == record(preempted[0], 4)["checksums"]


def _rewrite_largest_param(checkpoint_dir, step):
  """Changes one element of the step's largest params array through tensorstore, as
  silent corruption would: the files stay well-formed, only the values differ."""
  base = f"file://{checkpoint_dir}/{step}/state"
  kv = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
  metas = {k.decode()[:-len("/.zarray")]: json.loads(kv.read(k).result().value)
           for k in kv.list().result()
           if k.startswith(b"params.") and k.endswith(b"/.zarray")}
  name = max(metas, key=lambda k: np.prod(metas[k]["shape"]))
  array = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base,
                                                 "path": name + "/"}}).result()
  values = array.read().result()
  values.reshape(-1)[7] += 1.0
  array.write(values).result()
  return name.replace(".", "/")


def test_corrupt_arrays_resume_falls_back_and_extract_refuses(preempted, tmp_path, capsys):
  workdir = tmp_path / "w"
  shutil.copytree(preempted[0], workdir)
  corrupted = _rewrite_largest_param(checkpoints(workdir), 4)
  extract = run_cli(workdir, "--config=configs/demo.py:extract,tiny", driver=False)
  assert_one_line_error(extract, "checkpoint step 4", "corrupt", corrupted,
                        "Fallback: python -m vqvae2_jax.main "
                        f"--config=configs/demo.py:vqvae,tiny --workdir={workdir}")
  assert not os.path.exists(os.path.join(workdir, "extract", "manifest.json"))
  # Training resume: skips step 4 (saying why), resumes from 3, trains step 4 again.
  run_stage(load_config("demo", "vqvae,tiny", **{"vqvae_train.checkpoint_every": 1}),
            str(workdir))
  out = capsys.readouterr().out
  assert "checkpoint step 4 skipped: 1 array(s) differ" in out and corrupted in out
  assert "resumed from step 3" in out
  assert os.path.exists(os.path.join(checkpoints(workdir), "rejected", "4", "why.txt"))
  assert record(workdir, 4)["checksums"] == record(preempted[0], 4)["checksums"]

  # Random bytes over the array data file (what a bad disk does): the full-state restore
  # of a resume skips the step too, whether orbax fails to decode it or the sums differ.
  other = tmp_path / "bytes"
  shutil.copytree(preempted[0], other)
  data_dir = os.path.join(checkpoints(other), "4", "state", "ocdbt.process_0", "d")
  largest = max((os.path.join(data_dir, n) for n in os.listdir(data_dir)), key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 2)
    f.write(np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes())
  config = load_config("demo", "vqvae,tiny")
  with parallel.use_mesh(parallel.make_mesh(config.mesh), config.axis_rules):
    task = vqvae_stage.build_task(config, Workdir(str(other)))
    tx = state_lib.make_optimizer(config.vqvae_train)
    _, abstract, shardings = state_lib.plan_state(task.init_variables, tx, False)
  c = ckpt_lib.Checkpointer(checkpoints(other))
  try:
    _, rec, skipped = c.restore_newest_valid(
        state_lib.abstract_with_shardings(abstract, shardings))
  finally:
    c.close()
  assert rec["step"] == 3 and [s for s, _ in skipped] == [4]


def test_divergence_keeps_a_verified_step_and_a_sane_rerun_trains_on(tmp_path, capsys):
  # Warm-up from 0: step 1 moves nothing, step 2 applies lr 2.5e29 (finite but huge
  # parameters, saved), step 3 is NaN: step 2's checkpoint holds the parameters that
  # produced it and must not be what a rerun resumes from.
  overrides = {"vqvae_train.checkpoint_every": 1, "vqvae_train.warmup_steps": 4,
               "vqvae_train.eval_every": 0, "vqvae_train.image_every": 0}
  with pytest.raises(loop.NonFiniteLossError) as err:
    run_stage(load_config("demo", "vqvae,tiny",
                          **dict(overrides, **{"vqvae_train.learning_rate": 1e30})),
              str(tmp_path))
  message = str(err.value)
  assert "step 3 gave loss=nan" in message and "Kept: step 1" in message
  assert "now 1e+30" in message and "rejected/2" in message
  assert Workdir(str(tmp_path)).checkpoint_steps("vqvae") == [1]
  capsys.readouterr()
  run_stage(load_config("demo", "vqvae,tiny",
                        **dict(overrides, **{"vqvae_train.learning_rate": 1e-3})),
            str(tmp_path))
  assert "resumed from step 1" in capsys.readouterr().out
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "vqvae", "metrics.jsonl"))]
  train = [r for r in rows if r["split"] == "train"]
  assert train[-1]["step"] == 4 and all(np.isfinite(r["loss"]) for r in train)
  assert Workdir(str(tmp_path)).checkpoint_steps("vqvae")[-1] == 4


def test_bad_command_lines_are_one_line_errors(tmp_path):
  unknown = run_cli(tmp_path, STAGE, "--config.vqvae.hiden=3", driver=False)
  assert_one_line_error(unknown, "unknown config key 'vqvae.hiden'", "vqvae.hidden")
  bad = run_cli(tmp_path, STAGE, "--config.vqvae.upsample=bogus", driver=False)
  assert_one_line_error(bad, "config.vqvae.upsample='bogus'", "must be one of")
  debug = run_cli(tmp_path, STAGE, "--config.vqvae.upsample=bogus", "--debug", driver=False)
  assert debug.returncode == 1 and "Traceback" in debug.stderr
