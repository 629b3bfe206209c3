"""Orbax checkpointing shared by every training stage: save, keep-N, resume, preemption.

A checkpoint holds the train state (params, optimizer, codebook statistics, parameter EMA,
step, RNG key) restored with the shardings of the current mesh, and a JSON record of the
data position and the shape signature of the state. Resuming with a config whose shapes
differ fails before any array is read, naming the first differing entries.
"""
from __future__ import annotations

import os
import signal
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt or does not match the current config."""


def shape_signature(tree: Any) -> dict[str, list[int]]:
  """{'params/encoder/kernel': [3, 3, 3, 64], ...} of a tree of (abstract) arrays."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): list(np.shape(leaf))
          for path, leaf in flat}


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


def _register_array_handler() -> None:
  """Single-process saves write replicated arrays whole.

  Orbax's default splits a replicated array across the devices holding it (one slice
  program per array and device), which only pays off when several hosts share a save.
  """
  if jax.process_count() > 1:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(default, "_use_replica_parallel", None) is False:
    return  # already registered
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          use_replica_parallel=False,
          array_metadata_store=getattr(default, "_array_metadata_store", None)),
      override=True)


class Checkpointer:
  """An orbax CheckpointManager for one stage directory (`<workdir>/<stage>/checkpoints`)."""

  def __init__(self, directory: str, *, keep: int | None = 3):
    _register_array_handler()
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))
    self._sigterm = False

  def latest_step(self) -> int | None:
    """The newest saved step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
    """Saves `state` and a JSON record (`extra` plus the state's shape signature)."""
    record = dict(extra, shapes=shape_signature(state))
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)
    self._manager.wait_until_finished()

  def read_record(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record of a checkpoint (latest by default), without reading arrays."""
    step = self._require_step(step)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: {e}). "
          "Delete that step's folder to fall back to an earlier one.") from e
    return dict(restored.record)

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores into the shardings and dtypes of `abstract_state` (ShapeDtypeStructs)."""
    step = self._require_step(step)
    record = self.read_record(step)
    mismatch = describe_mismatch(record.get("shapes", {}), shape_signature(abstract_state))
    if mismatch:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} was written by a model of another shape:\n"
          f"{mismatch}\nUse the config it was trained with, or a new --workdir.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      raise CheckpointError(
          f"could not read checkpoint {self.directory}/{step} ({type(e).__name__}: {e}). "
          "It may be corrupt or incomplete: delete that step's folder to resume from an "
          "earlier one.") from e
    return restored.state, record

  def restore_partial(self, abstract_subtree: dict[str, Any], step: int | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores only the named top-level entries of a saved state (e.g. {'params': ...}).

    For inference: the optimizer moments and every entry not named are never read, so a
    restore costs the memory of what is asked for. `abstract_subtree` maps TrainState
    field names to trees of ShapeDtypeStructs carrying shardings; the shapes are checked
    against the record first, as in `restore`.
    """
    step = self._require_step(step)
    record = self.read_record(step)
    saved = record.get("shapes", {})
    wanted = shape_signature(abstract_subtree)
    mismatch = describe_mismatch({k: v for k, v in saved.items()
                                  if k.split("/")[0] in abstract_subtree}, wanted)
    if mismatch:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} was written by a model of another shape:\n"
          f"{mismatch}\nUse the config it was trained with, or a new --workdir.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=abstract_subtree,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree),
              partial_restore=True)))
    except Exception as e:
      raise CheckpointError(
          f"could not read checkpoint {self.directory}/{step} ({type(e).__name__}: {e}). "
          "It may be corrupt or incomplete: delete that step's folder to fall back to an "
          "earlier one.") from e
    return dict(restored.state), record

  def _require_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}: run the stage that "
                            "writes it first (or check --workdir)")
    return step

  # Preemption: SIGTERM (what schedulers and TPU maintenance send) or orbax's own signal.
  def install_sigterm_handler(self) -> None:
    """Makes SIGTERM request a save-and-exit at the next step instead of killing.

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
    try:
      signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a notebook worker)
      pass

  def should_stop(self, step: int) -> bool:
    """True once SIGTERM arrived or orbax reports a preemption at `step`."""
    return self._sigterm or self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
