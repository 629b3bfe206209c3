"""Restores tell corruption from failure: a read that fails without evidence about the
bytes (an I/O error, a timeout, an unreachable storage server, memory) moves nothing and
stops with one line; a transient one that clears is retried and resumes from the newest
step; flipped or missing bytes are still rejected and resume falls back.

Errors are injected under orbax's array handler, into the tensorstore read of one shard
(`fault_injection.failing_array_reads`), so orbax's own wrapping of them is exercised.
"""
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import checkpoint_reads
from vqvae2_jax.runner import run_stage
from vqvae2_jax.workdir import Workdir

from fault_injection import failing_array_reads, io_error, read_timeout
from helpers import ROOT, load_config

pytestmark = pytest.mark.xdist_group("restore_failures")

FAST = checkpoint_reads.RetryPolicy(tries=3, first_delay_s=0.01)
STEPS = [1, 2, 3]


def _state(step: int) -> dict:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  values = {"kernel": np.arange(40_000, dtype=np.float32).reshape(200, 200) * step,
            "bias": np.full((7,), step, np.float32)}
  return {k: jax.device_put(v, sharding) for k, v in values.items()}


def _abstract() -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      _state(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoints folder holding steps 1, 2, 3 of a two-array state."""
  directory = str(tmp_path_factory.mktemp("saved") / "checkpoints")
  c = ckpt_lib.Checkpointer(directory, keep=None)
  for step in STEPS:
    c.save(step, _state(step), {"step": step})
  c.close()
  return directory


@pytest.fixture
def checkpoints(saved, tmp_path, monkeypatch):
  """A copy of `saved` to damage; every Checkpointer retries with FAST by default."""
  monkeypatch.setattr(checkpoint_reads, "DEFAULT_RETRY", FAST)
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(saved, directory)
  return directory


def _resume(directory):
  c = ckpt_lib.Checkpointer(directory, keep=None)
  try:
    return c.restore_newest_valid(_abstract())
  finally:
    c.close()


def _steps_in_place(directory) -> bool:
  return (sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == STEPS
          and not os.path.exists(os.path.join(directory, ckpt_lib.REJECTED)))


def unreachable_server_error() -> ValueError:
  """The error tensorstore itself raises when its storage server does not answer (a
  closed port on 127.0.0.1; 'ABORTED: All 2 retry attempts failed: CURL error ...')."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  kv = ts.KvStore.open({"driver": "http", "base_url": f"http://127.0.0.1:{port}/",
                        "context": {"http_request_retries": {
                            "max_retries": 2, "initial_delay": "1ms", "max_delay": "2ms"}}
                        }).result()
  try:
    kv.read("array").result()
  except ValueError as e:
    return e
  raise AssertionError("a read from a closed port succeeded")


@pytest.fixture(scope="module")
def server_error():
  error = unreachable_server_error()
  assert checkpoint_reads.classify(error)[0] == checkpoint_reads.TRANSIENT, error
  return error


@pytest.mark.parametrize("error", ["oserror", "timeout", "unreachable_server"])
def test_persistent_read_failure_moves_nothing_and_is_one_line(checkpoints, error,
                                                               server_error, capsys):
  make_error = {"oserror": io_error, "timeout": read_timeout,
                "unreachable_server": lambda: server_error}[error]
  with failing_array_reads(3, make_error) as failed:
    with pytest.raises(ckpt_lib.CheckpointError) as raised:
      _resume(checkpoints)
  assert not isinstance(raised.value, ckpt_lib.CorruptCheckpointError), raised.value
  assert raised.value.kind == "transient" and raised.value.step == 3
  message = str(raised.value)
  assert "\n" not in message and len(message) < 1000, message
  assert "checkpoint step 3" in message and "after 3 tries" in message
  assert "nothing was moved" in message and "rerun the same command" in message
  assert {"oserror": "OSError: [Errno 5]", "timeout": "TimeoutError",
          "unreachable_server": "ABORTED"}[error] in message
  assert failed["failed"] >= 3  # every try read the arrays again
  assert _steps_in_place(checkpoints)
  assert capsys.readouterr().out.count("reading the arrays of checkpoint step 3 failed") == 2


def test_transient_failure_that_clears_resumes_from_the_newest_step(checkpoints, capsys):
  with failing_array_reads(3, io_error, times=1) as failed:
    state, record, skipped = _resume(checkpoints)
  assert failed["failed"] == 1 and record["step"] == 3 and skipped == []
  np.testing.assert_array_equal(np.asarray(state["bias"]), np.full((7,), 3, np.float32))
  assert "retry 1 of 2" in capsys.readouterr().out
  assert _steps_in_place(checkpoints)


def test_running_out_of_memory_is_not_corruption_and_not_retried(checkpoints):
  with failing_array_reads(3, MemoryError) as failed:
    with pytest.raises(ckpt_lib.CheckpointReadError, match="ran out of memory") as raised:
      _resume(checkpoints)
  assert raised.value.kind == "memory" and failed["failed"] >= 1
  assert _steps_in_place(checkpoints)


def test_an_unrecognised_error_moves_nothing(checkpoints):
  with failing_array_reads(3, lambda: RuntimeError("something new")) as failed:
    with pytest.raises(ckpt_lib.CheckpointReadError, match="not recognised as corruption"):
      _resume(checkpoints)
  assert failed["failed"] >= 1 and _steps_in_place(checkpoints)


def test_inference_restore_of_a_failing_step_is_a_read_error(checkpoints):
  c = ckpt_lib.Checkpointer(checkpoints, keep=None,
                            read_retry=checkpoint_reads.RetryPolicy(tries=2, first_delay_s=0))
  try:
    with failing_array_reads(3, read_timeout) as failed:
      with pytest.raises(ckpt_lib.CheckpointReadError, match="after 2 tries.*TimeoutError"):
        c.restore_partial({"bias": _abstract()["bias"]}, 3)
    assert failed["failed"] == 2
  finally:
    c.close()


def test_a_folder_that_cannot_be_listed_is_a_read_error(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint_reads, "DEFAULT_RETRY", FAST)
  (tmp_path / "a_file").write_text("not a folder")
  with pytest.raises(ckpt_lib.CheckpointReadError, match="could not list the checkpoints.*"
                     "3 tries.*NotADirectoryError"):
    ckpt_lib.Checkpointer(str(tmp_path / "a_file" / "checkpoints"))


def _array_file(directory, step):
  """The step's largest OCDBT data file (`state/ocdbt.process_0/d/*`): the arrays' bytes."""
  data = os.path.join(directory, str(step), "state", "ocdbt.process_0", "d")
  return max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)


def _index_file(directory, step):
  """The step's OCDBT root b-tree node (`state/d/*`, a few hundred bytes)."""
  index = os.path.join(directory, str(step), "state", "d")
  return os.path.join(index, os.listdir(index)[0])


def _flip(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _flip_array_bytes(directory, step):
  _flip(_array_file(directory, step))


def _flip_index_bytes(directory, step):
  _flip(_index_file(directory, step))


def _truncate_arrays(directory, step):
  path = _array_file(directory, step)
  os.truncate(path, os.path.getsize(path) // 2)


def _delete_record(directory, step):
  os.remove(os.path.join(directory, str(step), "record", "metadata"))


@pytest.mark.parametrize("corrupt", [_flip_array_bytes, _flip_index_bytes, _truncate_arrays,
                                     _delete_record],
                         ids=["flipped_array_bytes", "flipped_index_bytes",
                              "truncated_array_file", "missing_record"])
def test_corruption_is_still_rejected_and_resume_falls_back(checkpoints, corrupt):
  corrupt(checkpoints, 3)
  _, record, skipped = _resume(checkpoints)
  assert record["step"] == 2 and [s for s, _ in skipped] == [3]
  assert os.path.exists(os.path.join(checkpoints, ckpt_lib.REJECTED, "3", "why.txt"))


def test_classification_of_what_the_libraries_raise():
  kind = lambda e: checkpoint_reads.classify(e)[0]
  wrapped = Exception("Encountered error while reading array index")
  wrapped.__cause__ = ConnectionResetError(104, "Connection reset by peer")
  assert kind(wrapped) == "transient"
  assert kind(ValueError('OUT_OF_RANGE: Error reading "a/0.0" in OCDBT database: Requested '
                         "byte range [0, 268713) is not valid for value of size 134477")
              ) == "corrupt"
  assert kind(ValueError("DEADLINE_EXCEEDED: Error reading gs://b/x")) == "transient"
  assert kind(KeyError('Item "state" was not found in the checkpoint.')) == "corrupt"
  assert kind(FileNotFoundError("File .../record/metadata not found.")) == "corrupt"
  assert kind(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1GiB")) == "memory"
  assert kind(PermissionError(13, "Permission denied")) == "transient"
  with pytest.raises(ValueError) as invalid:  # tensorstore's INVALID_ARGUMENT: no code
    ts.open({"driver": "zarr", "kvstore": "memory://", "metadata": {"shape": [-1]}},
            create=True).result()
  assert kind(invalid.value) == "corrupt", invalid.value


def test_classification_of_what_a_bucket_client_raises():
  from gcsfs.retry import HttpError  # pylint: disable=g-import-not-at-top
  kind = lambda e: checkpoint_reads.classify(e)[0]
  assert kind(HttpError({"code": 503, "message": "Service Unavailable"})) == "transient"
  assert kind(HttpError({"code": 429, "message": "rate limit exceeded"})) == "transient"
  assert kind(HttpError({"code": 404, "message": "No such object"})) == "corrupt"
  assert kind(HttpError({"code": 400, "message": "Bad Request"})) == "unknown"


# The same failure in a real run: a stage rerun whose resume hits it.
STAGE = ["--config=configs/demo.py:vqvae,tiny", "--config.vqvae_train.checkpoint_every=1",
         "--config.vqvae_train.steps=6"]


def test_a_stage_rerun_stops_on_a_persistent_read_error_and_resumes_after(tmp_path, capsys):
  workdir = str(tmp_path)
  run_stage(load_config("demo", "vqvae,tiny", **{"vqvae_train.checkpoint_every": 1}),
            workdir)
  directory = Workdir(workdir).checkpoint_dir("vqvae")
  before = sorted(os.listdir(directory))
  env = dict(os.environ, FAULT="restore_oserror:4")
  failed = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fault_injection.py"),
                           *STAGE, f"--workdir={workdir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert failed.returncode == 1, failed.stderr[-3000:]
  lines = failed.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: could not read the arrays of "
                                                 "checkpoint step 4"), failed.stderr[-3000:]
  assert "OSError: [Errno 5]" in lines[0] and "nothing was moved" in lines[0]
  assert sorted(os.listdir(directory)) == before and ckpt_lib.REJECTED not in before
  assert "resumed" not in failed.stdout
  capsys.readouterr()
  run_stage(load_config("demo", "vqvae,tiny", **{"vqvae_train.checkpoint_every": 1,
                                                 "vqvae_train.steps": 6}), workdir)
  out = capsys.readouterr().out
  assert "resumed from step 4" in out and "skipped" not in out
  assert Workdir(workdir).checkpoint_steps("vqvae")[-1] == 6
