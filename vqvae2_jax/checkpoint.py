"""Orbax checkpointing shared by every training stage: save, verify, resume, preemption.

A checkpoint holds the train state (params, optimizer, codebook statistics, parameter EMA,
step, RNG key) restored with the shardings of the current mesh, and a JSON record of the
data position, the shape signature of the state and a checksum of every array
(`vqvae2_jax.integrity`). Restoring checks both: shapes that differ from the config fail
before any array is read, naming the first differing entries; arrays whose bytes changed
after the save fail as `CorruptCheckpointError`, naming the step and the arrays. Training
resume (`restore_newest_valid`) then falls back to the newest step that verifies and
moves the bad one to `<checkpoints>/rejected/<step>`; inference loading refuses.

Only evidence about the bytes makes a step corrupt (`vqvae2_jax.checkpoint_reads`): a read
that fails because the storage did not answer (an I/O error, a timeout) is retried with
backoff and, if it persists, fails as `CheckpointReadError`, moving nothing; so does
running out of memory, or any error not recognised as corruption.
"""
from __future__ import annotations

import contextlib
import logging as py_logging
import signal
from typing import Any, Callable

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from vqvae2_jax import checkpoint_reads
from vqvae2_jax import integrity
from vqvae2_jax import storage

REJECTED = "rejected"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt or does not match the current config."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint step cannot be read or its arrays differ from the recorded checksums.

  Attributes: directory (the checkpoints folder), step, reason (what failed), earlier
  (the older steps on disk).
  """

  def __init__(self, message: str, *, directory: str, step: int, reason: str,
               earlier: list[int]):
    super().__init__(message)
    self.directory, self.step, self.reason, self.earlier = directory, step, reason, earlier


class CheckpointReadError(CheckpointError):
  """A checkpoint step could not be read for a reason other than corruption (a storage
  failure that outlasted the retries, memory, an unrecognised error). Nothing was moved.

  Attributes: directory, step, kind ('transient', 'memory' or 'unknown': see
  `vqvae2_jax.checkpoint_reads`).
  """

  def __init__(self, message: str, *, directory: str, step: int, kind: str):
    super().__init__(message)
    self.directory, self.step, self.kind = directory, step, kind


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """Training stopped on SIGTERM (or an orbax preemption notice) after saving `step`."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def shape_signature(tree: Any) -> dict[str, list[int]]:
  """{'params/encoder/kernel': [3, 3, 3, 64], ...} of a tree of (abstract) arrays."""
  return {path: list(np.shape(leaf)) for path, leaf in integrity.leaf_paths(tree)}


def describe_mismatch(saved: dict[str, list[int]], current: dict[str, list[int]],
                      limit: int = 6) -> str:
  """Human-readable differences between two shape signatures ('' when equal)."""
  lines = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if a != b:
      lines.append(f"  {key}: checkpoint {a if a is not None else 'absent'}, "
                   f"config {b if b is not None else 'absent'}")
  more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
  return "\n".join(lines[:limit]) + more


class _DropRegistryOverride(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return "Type handler registry" not in record.getMessage()


def _register_array_handler() -> None:
  """Single-process saves write replicated arrays whole.

  Orbax's default splits a replicated array across the devices holding it (one slice
  program per array and device), which only pays off when several hosts share a save.
  Orbax warns on every override of a handler; this one is deliberate, so that warning
  is dropped.
  """
  if jax.process_count() > 1:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(default, "_use_replica_parallel", None) is False:
    return  # already registered
  quiet = _DropRegistryOverride()
  absl_logger = logging.get_absl_logger()
  absl_logger.addFilter(quiet)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False,
            array_metadata_store=getattr(default, "_array_metadata_store", None)),
        override=True)
  finally:
    absl_logger.removeFilter(quiet)


class Checkpointer:
  """An orbax CheckpointManager for one stage directory (`<workdir>/<stage>/checkpoints`)."""

  def __init__(self, directory: str, *, keep: int | None = 3,
               read_retry: checkpoint_reads.RetryPolicy | None = None):
    """keep: the newest steps kept (None: all). read_retry: how reads that fail
    transiently are retried (default `checkpoint_reads.DEFAULT_RETRY`)."""
    _register_array_handler()
    self.read_retry = read_retry or checkpoint_reads.DEFAULT_RETRY
    self.directory = storage.absolute(directory)  # a local folder or a bucket URL
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False,
                                           # a save killed mid-way leaves a tmp folder
                                           cleanup_tmp_directories=True)
    # Lists the saved steps: retried like a read, and never a reason to move anything.
    self._manager = self._list(lambda: ocp.CheckpointManager(self.directory,
                                                             options=options))
    self._sigterm = False
    self._handler_installed, self._previous_handler = False, None
    self._preemption_checked: dict[int, bool] = {}

  def latest_step(self) -> int | None:
    """The newest saved step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
    """Saves `state` and a JSON record: `extra`, the shape signature, array checksums.

    Collective over processes. The checksums are computed on the host from the shards
    each process holds (see `vqvae2_jax.integrity`), before orbax writes the same bytes.
    """
    record = dict(extra, shapes=shape_signature(state),
                  checksums=integrity.tree_checksums(state))
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)
    self._manager.wait_until_finished()

  def read_record(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record of a checkpoint (latest by default), without reading arrays."""
    step = self._require_step(step)
    restored = self._read(step, "record", lambda: self._manager.restore(
        step, args=ocp.args.Composite(record=ocp.args.JsonRestore())))
    return dict(restored.record)

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores into the shardings and dtypes of `abstract_state` (ShapeDtypeStructs).

    Raises CheckpointError when the shapes differ from the record, CorruptCheckpointError
    when the step is unreadable or an array's checksum differs from the recorded one."""
    step = self._require_step(step)
    record = self.read_record(step)
    self._check_shapes(step, record.get("shapes", {}), shape_signature(abstract_state))
    restored = self._read(step, "arrays", lambda: self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))))
    self._verify(step, record, restored.state)
    return restored.state, record

  def restore_partial(self, abstract_subtree: dict[str, Any], step: int | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores only the named top-level entries of a saved state (e.g. {'params': ...}).

    For inference: the optimizer moments and every entry not named are never read, so a
    restore costs the memory of what is asked for. `abstract_subtree` maps TrainState
    field names to trees of ShapeDtypeStructs carrying shardings; the shapes are checked
    against the record first and the checksums of the restored arrays after, as in
    `restore`.
    """
    step = self._require_step(step)
    record = self.read_record(step)
    saved = record.get("shapes", {})
    self._check_shapes(step, {k: v for k, v in saved.items()
                              if k.split("/")[0] in abstract_subtree},
                       shape_signature(abstract_subtree))
    restored = self._read(step, "arrays", lambda: self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_subtree,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree),
            partial_restore=True))))
    state = dict(restored.state)
    self._verify(step, record, state)
    return state, record

  def restore_newest_valid(self, abstract_state: Any
                           ) -> tuple[Any, dict[str, Any], list[tuple[int, str]]] | None:
    """For resuming training: the newest step that restores and verifies.

    Steps that fail verification are moved to `<checkpoints>/rejected/<step>` (so later
    saves of those step numbers start clean) once an older step verified; if none does,
    nothing is moved and the newest step's CorruptCheckpointError is raised. A shape
    mismatch is raised at once (it is the config, not the files), and so is a
    CheckpointReadError (a read that failed without evidence of corruption: nothing is
    moved, the rerun reads the same steps again). Returns None when the
    directory holds no checkpoint, else (state, record, [(skipped step, why), ...]).
    """
    steps = self.all_steps()
    if not steps:
      return None
    skipped: list[tuple[int, str]] = []
    first_error = None
    for step in reversed(steps):
      try:
        state, record = self.restore(abstract_state, step)
      except CorruptCheckpointError as e:
        first_error = first_error or e
        skipped.append((step, e.reason))
        continue
      for bad, why in skipped:
        self.reject(bad, why)
      return state, record, skipped
    raise CheckpointError(
        f"no checkpoint in {self.directory} verifies (steps {', '.join(map(str, steps))}); "
        f"the newest: {first_error}. Move the folder aside to train from scratch, or use a "
        "new --workdir.")

  def reject(self, step: int, why: str) -> str:
    """Moves step `step` out of the manager's view, to `<checkpoints>/rejected/<step>`,
    with the reason in `why.txt`; returns the new path. Collective over processes.

    On a bucket (no rename) the step is copied, the copy verified, then the original
    deleted (`storage.move_tree`)."""
    target = storage.join(self.directory, REJECTED, str(step))
    if jax.process_index() == 0:
      storage.move_tree(storage.join(self.directory, str(step)), target)
      storage.write_text(storage.join(target, "why.txt"), why + "\n")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_reject_{step}")
    self._manager.reload()
    return target

  def _check_shapes(self, step: int, saved: dict, wanted: dict) -> None:
    mismatch = describe_mismatch(saved, wanted)
    if mismatch:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} was written by a model of another shape:\n"
          f"{mismatch}\nUse the config it was trained with, or a new --workdir.")

  def _verify(self, step: int, record: dict, restored: Any) -> None:
    recorded = record.get("checksums")
    if recorded is None:
      logging.warning("checkpoint %s/%d predates array checksums: not verified",
                      self.directory, step)
      return
    bad = integrity.mismatched(recorded, restored)
    if bad:
      names = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
      raise self._corrupt(step, f"{len(bad)} array(s) differ from the checksums recorded "
                                f"when it was saved ({names})")

  def _read(self, step: int, what: str, read: Callable[[], Any]) -> Any:
    """read() of step `step`'s `what` ('record' or 'arrays'), retried while it fails
    transiently; CorruptCheckpointError on evidence of corruption, else
    CheckpointReadError."""
    try:
      return checkpoint_reads.read_with_retries(
          read, self.read_retry, f"the {what} of checkpoint step {step}")
    except checkpoint_reads.ReadFailed as failed:
      cause = checkpoint_reads.describe(failed.cause)
      if failed.kind == checkpoint_reads.CORRUPT:
        verb = "is" if what == "record" else "are"
        raise self._corrupt(step, f"its {what} {verb} unreadable ({cause})") from failed
      raise self._read_failure(step, what, failed) from failed

  def _list(self, read: Callable[[], Any]) -> Any:
    """read() of the folder's list of steps, retried; CheckpointReadError if it fails."""
    try:
      return checkpoint_reads.read_with_retries(
          read, self.read_retry, f"the list of checkpoints in {self.directory}")
    except checkpoint_reads.ReadFailed as failed:
      raise CheckpointReadError(
          f"could not list the checkpoints in {self.directory} ({failed.tries} tries: "
          f"{checkpoint_reads.describe(failed.cause)}). Check the storage (and the "
          "--workdir), then rerun the same command.", directory=self.directory, step=-1,
          kind=failed.kind) from failed

  def _read_failure(self, step: int, what: str, failed: checkpoint_reads.ReadFailed
                    ) -> CheckpointReadError:
    where = f"the {what} of checkpoint step {step} in {self.directory}"
    cause = checkpoint_reads.describe(failed.cause)
    aside = (f"if it fails again, move {self.directory}/{step} aside to resume from the "
             "step before")
    if failed.kind == checkpoint_reads.TRANSIENT:
      message = (f"could not read {where} after {failed.tries} tries over "
                 f"{failed.waited_s:.0f}s ({cause}): a storage or network failure, not "
                 "corruption, so nothing was moved. Check the storage, then rerun the same "
                 "command; it resumes from this step.")
    elif failed.kind == checkpoint_reads.MEMORY:
      message = (f"ran out of memory reading {where} ({cause}): not corruption, so "
                 "nothing was moved. Free host or device memory (or use a machine with "
                 "more), then rerun the same command.")
    else:
      message = (f"could not read {where} ({cause}): not recognised as corruption, so "
                 f"nothing was moved. Rerun the same command; {aside} (--debug shows "
                 "the traceback).")
    return CheckpointReadError(message, directory=self.directory, step=step,
                               kind=failed.kind)

  def _corrupt(self, step: int, reason: str) -> CorruptCheckpointError:
    earlier = [s for s in self.all_steps() if s < step]
    fallback = (f"earlier steps on disk: {', '.join(map(str, earlier))}" if earlier
                else "no earlier step on disk")
    return CorruptCheckpointError(
        f"checkpoint step {step} in {self.directory} is corrupt: {reason}. Rerun the "
        f"training stage that wrote it with the same --workdir: it falls back to the newest "
        f"step that verifies ({fallback}) and trains on.",
        directory=self.directory, step=step, reason=reason, earlier=earlier)

  def _require_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}: run the stage that "
                            "writes it first (or check --workdir)")
    return step

  # Preemption: SIGTERM (what schedulers and TPU maintenance send) or orbax's own signal.
  def install_sigterm_handler(self) -> None:
    """Makes SIGTERM request a save-and-exit instead of killing, until `close`.

    Single-process only: with several processes JAX's distributed runtime already turns
    SIGTERM into a preemption notice that every process sees at the same step (through
    `reached_preemption`); a per-process flag would make one process save alone and wait
    forever for the others.
    """
    if jax.process_count() > 1:
      return
    def handler(signum, frame):
      del signum, frame
      logging.warning("SIGTERM received: saving a checkpoint and exiting.")
      self._sigterm = True
    with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook worker)
      self._previous_handler = signal.signal(signal.SIGTERM, handler)
      self._handler_installed = True

  def should_stop(self, step: int) -> bool:
    """True once SIGTERM arrived or orbax reports a preemption at `step`.

    Orbax's sync point is asked once per step (every process at the same steps); the
    SIGTERM flag on every call, so a signal during evaluation is seen right after it."""
    if step not in self._preemption_checked:
      self._preemption_checked = {step: self._manager.reached_preemption(step)}
    return self._sigterm or self._preemption_checked[step]

  def close(self) -> None:
    """Waits for pending writes, releases the manager and restores SIGTERM's handler."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self._handler_installed:
      with contextlib.suppress(ValueError, TypeError):  # TypeError: a handler set from C
        signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
      self._handler_installed = False

