"""Multi-process training: 2 processes x 2 devices == 1 process x 4 devices.

The end-to-end test starts real `jax.distributed` processes on 127.0.0.1 through
launch/local_multiprocess.py and compares the orbax checkpoint they write together with
the one a single 4-device process writes for the same global batch. The launcher's
failure handling and `maybe_initialize_distributed` are checked without JAX processes.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from vqvae2_jax import parallel
from vqvae2_jax import builders
from vqvae2_jax import restore as restore_lib
from vqvae2_jax.workdir import Workdir
from vqvae2_jax.train import loop

from helpers import ROOT, load_config

LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.py")
STEPS = 3
# The same run in both layouts: evaluation/pictures only at the end, one checkpoint.
OVERRIDES = {"vqvae_train.eval_every": 0, "vqvae_train.image_every": 0,
             "vqvae_train.steps": STEPS, "vqvae_train.log_every": 1,
             "vqvae_train.checkpoint_every": 100}


def _load_launcher():
  spec = importlib.util.spec_from_file_location("local_multiprocess", LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


launcher = _load_launcher()


def main_command(workdir):
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return [sys.executable, "-m", "vqvae2_jax.main", "--config=configs/demo.py:vqvae,tiny",
          f"--workdir={workdir}", *flags]


def base_env():
  """This process's environment with the test XLA flags (device count is replaced)."""
  env = dict(os.environ)
  if "--xla_backend_optimization_level" not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  return env


def can_bind_localhost():
  try:
    launcher.free_port()
    return True
  except OSError:
    return False


def run_side_by_side(log_dir, single_command, multi_command, timeout: int) -> str:
  """Runs `single_command` on one process with 4 devices and `multi_command` on two
  processes with 2 each (the launcher), side by side: most of their time is
  single-threaded compilation. Skips when the coordinator cannot bind its port; fails
  with the log's tail when either run fails. Returns the two-process log."""
  with open(os.path.join(log_dir, "multi.log"), "w+") as multi_log, \
       open(os.path.join(log_dir, "single.log"), "w+") as single_log:
    ref = subprocess.Popen(single_command, cwd=ROOT, env=launcher.process_env(4, base_env()),
                           stdout=single_log, stderr=subprocess.STDOUT)
    try:
      code = subprocess.run(
          [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=2",
           f"--timeout={timeout}", "--", *multi_command],
          cwd=ROOT, env=base_env(), stdout=multi_log, stderr=subprocess.STDOUT,
          timeout=timeout + 60).returncode
      ref_code = ref.wait(timeout=timeout)
    finally:
      if ref.poll() is None:
        ref.kill()
        ref.wait()
    multi_log.seek(0)
    single_log.seek(0)
    multi_out, single_out = multi_log.read(), single_log.read()
  if code and re.search(r"failed to add port|no address added|failed to bind", multi_out,
                        re.IGNORECASE):
    pytest.skip("jax.distributed could not bind its coordinator port on 127.0.0.1")
  assert code == 0, multi_out[-6000:]
  assert ref_code == 0, single_out[-6000:]
  return multi_out


def restore(workdir):
  """(state, record) of the latest vqvae checkpoint under `workdir`, on one device."""
  config = load_config("demo", "vqvae,tiny", **OVERRIDES)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  init = builders.vqvae_init_fn(builders.build_vqvae(config), config.data.image_size)
  with parallel.use_mesh(mesh, config.axis_rules):
    return restore_lib.restore_train_state(Workdir(workdir), "vqvae", init,
                                           config.vqvae_train)


def train_losses(workdir):
  with open(os.path.join(workdir, "vqvae", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.skipif(not can_bind_localhost(),
                    reason="cannot bind a TCP port on 127.0.0.1 for the jax.distributed "
                           "coordinator")
def test_two_processes_equal_one_process(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  run_side_by_side(tmp_path, main_command(single), main_command(multi), timeout=240)

  # Both processes wrote their part of the checkpoint.
  metadata = os.path.join(multi, "vqvae", "checkpoints", str(STEPS), "state",
                          "array_metadatas")
  assert sorted(os.listdir(metadata)) == ["process_0", "process_1"]
  assert os.listdir(os.path.join(single, "vqvae", "checkpoints", str(STEPS), "state",
                                 "array_metadatas")) == ["process_0"]

  multi_state, multi_record = restore(multi)
  single_state, single_record = restore(single)
  assert int(multi_state.step) == int(single_state.step) == STEPS
  assert multi_record["data"] == single_record["data"]
  # Parameters and the EMA codebook statistics (model_state['vq_stats']) after 3 steps.
  a = jax.device_get((multi_state.params, multi_state.model_state))
  b = jax.device_get((single_state.params, single_state.model_state))
  assert "vq_stats" in multi_state.model_state
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)
  # Process 0's metrics are those of the global batch, step by step.
  multi_losses, single_losses = train_losses(multi), train_losses(single)
  assert sorted(multi_losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([multi_losses[s] for s in sorted(multi_losses)],
                             [single_losses[s] for s in sorted(multi_losses)], rtol=1e-5)


# --- the launcher, with plain Python children (no JAX) -------------------------------

_CHILD = """
import os, sys, time, json
pid = int([a for a in sys.argv if a.startswith('--config.distributed.process_id=')][0]
          .split('=')[1])
print(json.dumps(dict(argv=sys.argv[1:], xla=os.environ['XLA_FLAGS'],
                      platforms=os.environ['JAX_PLATFORMS'])), flush=True)
mode = sys.argv[1]
if mode == 'fail' and pid == 1:
  sys.exit(3)
if mode in ('fail', 'hang'):
  time.sleep(120)
"""


def run_launcher(mode, *extra):
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 "
             "--xla_force_host_platform_device_count=8")
  start = time.monotonic()
  run = subprocess.run(
      [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=3", *extra,
       "--", sys.executable, "-c", _CHILD, mode],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=90)
  return run, time.monotonic() - start


def test_launcher_passes_flags_and_environment():
  run, _ = run_launcher("ok")
  assert run.returncode == 0, run.stdout
  seen = {}
  for line in run.stdout.splitlines():
    m = re.match(r"\[p(\d)\] (\{.*)", line)
    if m:
      seen[int(m.group(1))] = json.loads(m.group(2))
  assert sorted(seen) == [0, 1]
  addresses = set()
  for i, info in seen.items():
    assert info["platforms"] == "cpu"
    assert info["xla"].split() == ["--xla_backend_optimization_level=0",
                                   "--xla_force_host_platform_device_count=3"]
    flags = dict(a.split("=", 1) for a in info["argv"][1:])
    assert flags["--config.distributed.initialize"] == "True"
    assert flags["--config.distributed.num_processes"] == "2"
    assert flags["--config.distributed.process_id"] == str(i)
    addresses.add(flags["--config.distributed.coordinator_address"])
  assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:")


def test_launcher_stops_peers_when_one_fails():
  # Process 1 exits with 3 at once; process 0 would sleep 120 s if not stopped.
  run, _ = run_launcher("fail", "--timeout=80")
  assert run.returncode == 3, run.stdout
  assert "process 1 exited with status 3" in run.stdout


def test_launcher_timeout_stops_everything():
  run, _ = run_launcher("hang", "--timeout=2")
  assert run.returncode == launcher.TIMEOUT_STATUS, run.stdout
  assert "timeout after 2s" in run.stdout


# --- maybe_initialize_distributed, with jax.distributed.initialize recorded ----------

def dist(**kw):
  return ConfigDict(dict(dict(initialize=False, coordinator_address="", num_processes=0,
                              process_id=-1), **kw))


@pytest.fixture
def calls(monkeypatch):
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.delenv("VQVAE2_DISTRIBUTED", raising=False)
  return recorded


def test_initialize_only_when_asked(calls, monkeypatch):
  parallel.maybe_initialize_distributed(dist())
  monkeypatch.setenv("VQVAE2_DISTRIBUTED", "0")
  parallel.maybe_initialize_distributed(dist())
  assert calls == []
  # Cluster auto-detection (TPU VM, SLURM): nothing is passed.
  monkeypatch.setenv("VQVAE2_DISTRIBUTED", "1")
  parallel.maybe_initialize_distributed(dist())
  monkeypatch.delenv("VQVAE2_DISTRIBUTED")
  parallel.maybe_initialize_distributed(dist(initialize=True))
  assert calls == [{}, {}]


def test_initialize_passes_explicit_fields(calls):
  parallel.maybe_initialize_distributed(dist(
      initialize=True, coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3))
  assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                        process_id=3)]
  with pytest.raises(ValueError, match="process_id=4 must be below"):
    parallel.maybe_initialize_distributed(dist(
        initialize=True, coordinator_address="h:1", num_processes=4, process_id=4))


def test_initialize_is_skipped_once_initialized(calls, monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  parallel.maybe_initialize_distributed(dist(initialize=True))
  assert calls == []


def test_initialize_without_cluster_is_a_clear_error(monkeypatch):
  def fail(**kw):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  with pytest.raises(ValueError, match="coordinator_address=HOST:PORT"):
    parallel.maybe_initialize_distributed(dist(initialize=True))
