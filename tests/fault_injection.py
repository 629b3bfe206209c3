"""Runs the CLI with one injected fault (for tests/test_faults.py and the fault battery).

  FAULT=<kind>:<step> python tests/fault_injection.py --config=... --workdir=... [...]

kinds:
  sigterm_step      SIGTERM while step <step>'s batch is drawn (seen after that step)
  sigterm_evaluate  SIGTERM inside the evaluation that runs after step <step>
  sigterm_pictures  SIGTERM inside the picture writing after step <step>
  sigterm_compile   SIGTERM 0.3 s after batch <step> is drawn (with 1: inside the first
                    step's compilation)
  sigkill_save      SIGKILL inside the save of step <step>, after its arrays are written
                    and before orbax commits the step (the rename of its tmp folder)
  sigkill_write     SIGKILL inside the save of step <step>, while its arrays are written

The faults are injected by wrapping the TrainTask that every training stage hands to
`train.loop.train`, and orbax's commit, so the code under test runs unmodified.
"""
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from vqvae2_jax import checkpoint as ckpt_lib  # noqa: E402
from vqvae2_jax import main  # noqa: E402
from vqvae2_jax.train import loop  # noqa: E402


class _SignalOnBatch:
  """Loader wrapper: sends `sig` to this process when batch number `at` is drawn."""

  def __init__(self, loader, at, sig, delay=0.0):
    self.loader, self.at, self.sig, self.delay, self.count = loader, at, sig, delay, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      if self.delay:
        threading.Timer(self.delay, os.kill, (os.getpid(), self.sig)).start()
      else:
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


def install(kind: str, at: int) -> None:
  """Patches the training loop (and orbax for SIGKILL faults) to inject one fault."""
  original_train = loop.train

  def train(task, *args, **kwargs):
    if kind == "sigterm_step":
      task.loader = _SignalOnBatch(task.loader, at, signal.SIGTERM)
    elif kind == "sigterm_compile":
      task.loader = _SignalOnBatch(task.loader, at, signal.SIGTERM, delay=0.3)
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
