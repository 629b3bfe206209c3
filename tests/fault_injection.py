"""Runs the CLI with one injected fault (for the fault tests and the fault battery).

  FAULT=<kind>:<step> python tests/fault_injection.py --config=... --workdir=... [...]

kinds:
  sigterm_step      SIGTERM while step <step>'s batch is drawn (seen after that step)
  sigterm_evaluate  SIGTERM inside the evaluation that runs after step <step>
  sigterm_pictures  SIGTERM inside the picture writing after step <step>
  sigterm_compile   SIGTERM inside the first step's compilation (while jit traces the
                    loss; <step> must be 1)
  sigkill_save      SIGKILL inside the save of step <step>, after its arrays are written
                    and before orbax commits the step (the rename of its tmp folder)
  sigkill_write     SIGKILL inside the save of step <step>, while its arrays are written
  restore_oserror   every array read of checkpoint step <step> fails with OSError(EIO)
  restore_timeout   every array read of checkpoint step <step> fails with TimeoutError
                    (both: checkpoint read retries shortened to 3 tries, 0.05 s apart)

The faults are injected by wrapping the TrainTask that every training stage hands to
`train.loop.train`, orbax's commit, and the tensorstore read under orbax's array handler
(`failing_array_reads`, also used in-process by the tests), so the code under test runs
unmodified. `SIGTERM_POINTS`, `final_checksums` and `preempted_cleanly` are what the CI
tests and the battery share to judge a run.
"""
import contextlib
import errno
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402
from orbax.checkpoint._src.serialization import serialization  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from vqvae2_jax import checkpoint as ckpt_lib  # noqa: E402
from vqvae2_jax import checkpoint_reads  # noqa: E402
from vqvae2_jax import main  # noqa: E402
from vqvae2_jax.train import loop  # noqa: E402

# Every safe point a SIGTERM is tested at in CI (tests/test_preemption_points.py), as
# FAULT values for `<stage>,tiny` with a checkpoint every 2 of its 4 steps, evaluation
# and pictures after step 4: {what the point is: FAULT}.
SIGTERM_POINTS = {
    "first_compile": "sigterm_compile:1",
    "step_1": "sigterm_step:1",
    "save_step": "sigterm_step:2",
    "last_step": "sigterm_step:4",
    "pictures": "sigterm_pictures:4",
    "evaluation": "sigterm_evaluate:4",
}


def final_checksums(workdir: str, stage: str, step: int) -> dict[str, str]:
  """The array checksums recorded with checkpoint `step` of `stage` (bit-exact state)."""
  path = os.path.join(workdir, stage, "checkpoints", str(step), "record", "metadata")
  with open(path) as f:
    return json.load(f)["checksums"]


def preempted_cleanly(returncode: int, stdout: str, stage: str) -> bool:
  """A SIGTERM'd run's verdict: exit 0 with the preemption line (or, when the signal came
  before training started, the line for that; or it finished first)."""
  return returncode == 0 and (f"[{stage}] preempted: saved step" in stdout
                              or "preempted outside training" in stdout
                              or f"[{stage}] done" in stdout)


@contextlib.contextmanager
def failing_array_reads(step: int, make_error, times: int | None = None):
  """Makes the tensorstore reads of checkpoint step `step`'s arrays raise make_error().

  The read fails below orbax's array handler (`serialization._read_shard`, which reads one
  shard of one array through tensorstore), so orbax wraps the error as it would a real
  one. Works for any storage: the step is recognised in the array's tensorstore spec
  (`.../<step>/state/` on disk or in a bucket). times: how many reads fail (None: all).
  Yields {'failed': reads failed so far}."""
  original = serialization._read_shard  # pylint: disable=protected-access
  counter = {"failed": 0}
  marks = (f'"{step}/state/', f'/{step}/state/')

  async def read_shard(t, **kwargs):
    spec = json.dumps(t.spec().to_json())
    if any(m in spec for m in marks) and (times is None or counter["failed"] < times):
      counter["failed"] += 1
      raise make_error()
    return await original(t, **kwargs)

  serialization._read_shard = read_shard  # pylint: disable=protected-access
  try:
    yield counter
  finally:
    serialization._read_shard = original  # pylint: disable=protected-access


def io_error() -> OSError:
  return OSError(errno.EIO, os.strerror(errno.EIO))


def read_timeout() -> TimeoutError:
  return TimeoutError("read of the array timed out")


class _SignalOnBatch:
  """Loader wrapper: sends `sig` to this process when batch number `at` is drawn."""

  def __init__(self, loader, at, sig):
    self.loader, self.at, self.sig, self.count = loader, at, sig, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      os.kill(os.getpid(), self.sig)
    return next(self.loader)

  def get_state(self):
    return self.loader.get_state()

  def set_state(self, s):
    self.count = 0
    self.loader.set_state(s)


def _signal_inside(fn, at, sig):
  def wrapped(state, *args):
    if int(state.step) == at:
      os.kill(os.getpid(), sig)
    return fn(state, *args)
  return wrapped


def _signal_while_traced(loss_fn, sig):
  """The loss, sending `sig` the first time it runs: when jit traces the first step, the
  first stage of its compilation (Python's handler runs right away, the save after the
  step: as for a signal during XLA's compile, which Python sees once it returns)."""
  sent = {"done": False}

  def wrapped(*args, **kwargs):
    if not sent["done"]:
      sent["done"] = True
      os.kill(os.getpid(), sig)
    return loss_fn(*args, **kwargs)
  return wrapped


_KEEP_FOR_THE_RUN = []


def install(kind: str, at: int) -> None:
  """Patches the training loop (orbax for SIGKILL and restore faults) to inject one fault."""
  if kind in ("restore_oserror", "restore_timeout"):
    checkpoint_reads.DEFAULT_RETRY = checkpoint_reads.RetryPolicy(tries=3,
                                                                  first_delay_s=0.05)
    make_error = io_error if kind == "restore_oserror" else read_timeout
    _KEEP_FOR_THE_RUN.append(failing_array_reads(at, make_error))
    _KEEP_FOR_THE_RUN[-1].__enter__()  # (a dropped one would be closed, undoing itself)
    return
  if kind == "sigterm_compile" and at != 1:
    raise ValueError("sigterm_compile:<step>: only the first step compiles; use 1")
  original_train = loop.train

  def train(task, *args, **kwargs):
    if kind == "sigterm_step":
      task.loader = _SignalOnBatch(task.loader, at, signal.SIGTERM)
    elif kind == "sigterm_compile":
      task.loss_fn = _signal_while_traced(task.loss_fn, signal.SIGTERM)
    elif kind == "sigterm_evaluate" and task.evaluate is not None:
      task.evaluate = _signal_inside(task.evaluate, at, signal.SIGTERM)
    elif kind == "sigterm_pictures" and task.pictures is not None:
      task.pictures = _signal_inside(task.pictures, at, signal.SIGTERM)
    return original_train(task, *args, **kwargs)
  loop.train = train

  if kind in ("sigkill_save", "sigkill_write"):
    armed = {"on": False}
    original_save = ckpt_lib.Checkpointer.save

    def save(self, step, state, extra):
      armed["on"] = step == at
      return original_save(self, step, state, extra)
    ckpt_lib.Checkpointer.save = save

    def kill_if_armed(fn):
      def wrapped(*args, **kwargs):
        if armed["on"]:
          os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
      return wrapped
    if kind == "sigkill_save":
      for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        cls.finalize = kill_if_armed(cls.finalize)
    else:
      handler = ocp.type_handlers.ArrayHandler
      handler.serialize = kill_if_armed(handler.serialize)


if __name__ == "__main__":
  fault = os.environ.get("FAULT", "")
  if fault:
    name, step = fault.split(":")
    install(name, int(step))
  app.run(main.main, flags_parser=main.parse_flags)
