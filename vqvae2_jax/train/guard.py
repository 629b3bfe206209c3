"""What the training loop keeps on disk: one save per step, divergence rollback, preemption.

Divergence: every step checks its loss and gradient norm on the host. A step computes
both from the parameters of the step before, so a finite check *verifies* those
parameters; a checkpoint is only trusted once the step after it passed. When a check
fails and the newest checkpoint holds the parameters that failed (it was saved by the
step before and nothing checked it yet), that checkpoint is moved to
`<checkpoints>/rejected/` and the error names the step, the values and the step kept.
The final checkpoint is checked before it is written, by one extra step on a copy of the
state (its update is discarded), so no kept checkpoint's next step is unknown.

Preemption: SIGTERM (single process) or orbax's preemption notice (several) is honoured
at the next safe point (after a step, before or after evaluation and pictures): the state
is saved once and `checkpoint.Preempted` is raised. Evaluation or pictures that were due
at that step and had not run are recorded in the checkpoint as `pending` and run first
by the rerun, so a run preempted on its final step still finishes its outputs.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import parallel


class NonFiniteLossError(FloatingPointError):
  """A step's loss or gradient norm was NaN or infinite. The checkpoint holding the
  parameters that produced it (if any) was moved aside; the message names what is kept."""


class CheckpointGuard:
  """Saves, verifies and rolls back the checkpoints of one `train` call.

  name: the task name for messages. loader: the task's loader (get_state for records).
  steps: the run's final step. learning_rate: quoted in the divergence message.
  """

  def __init__(self, name: str, checkpointer: ckpt_lib.Checkpointer, loader,
               steps: int, learning_rate: float):
    self.name, self.checkpointer, self.loader = name, checkpointer, loader
    self.steps, self.learning_rate = steps, learning_rate
    self.saved: int | None = None  # the step whose state this run saved or resumed from
    self.unchecked: int | None = None  # a saved step no later step has checked yet

  def resume(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """Restores the newest checkpoint that verifies; None when there is none.

    Returns (state, record); the record's 'pending' lists evaluation/pictures still due
    at its step. Skipped (corrupt) steps are reported on stdout."""
    restored = self.checkpointer.restore_newest_valid(abstract_state)
    if restored is None:
      return None
    state, record, skipped = restored
    step = int(record["step"])
    for bad, why in skipped:
      parallel.print0(f"[{self.name}] checkpoint step {bad} skipped: {why}. Moved to "
                      f"{self.checkpointer.directory}/{ckpt_lib.REJECTED}/{bad}; resuming "
                      f"from step {step}.")
    # Conservative: the step after a resumed checkpoint verifies it again.
    self.saved = self.unchecked = step
    return state, record

  def check(self, step: int, metrics: dict[str, jax.Array], *, probe: bool = False) -> None:
    """Raises NonFiniteLossError unless step `step`'s loss and grad_norm are finite.

    probe: the step was the extra check of the final parameters (not an update)."""
    loss, grad_norm = (float(v) for v in jax.device_get(
        (metrics["loss"], metrics["grad_norm"])))
    if np.isfinite(loss) and np.isfinite(grad_norm):
      self.unchecked = None
      return
    what = (f"the check of the final parameters (step {step - 1}) gave" if probe
            else f"step {step} gave")
    message = (f"[{self.name}] {what} loss={loss:.4g}, grad_norm={grad_norm:.4g} from the "
               f"parameters of step {step - 1}.")
    if self.unchecked == step - 1:
      path = self.checkpointer.reject(
          step - 1, f"the next step gave loss={loss}, grad_norm={grad_norm}")
      message += f" Checkpoint step {step - 1}, which holds them, was moved to {path}."
      self.saved = self.unchecked = None
    elif probe:
      message += f" The final step {step - 1} was not saved."
    kept = self.checkpointer.latest_step()
    message += (f" Kept: step {kept} (a rerun resumes from it)." if kept is not None else
                " No checkpoint is kept: a rerun starts from scratch.")
    raise NonFiniteLossError(
        message + f" Lower the learning rate (now {self.learning_rate:g}), set "
        "grad_clip_norm, or check the data; then rerun the same command.")

  def save(self, step: int, state: Any, step_fn: Callable, next_batch: Callable[[], Any],
           pending: Sequence[str] = ()) -> None:
    """Saves `state` as step `step`, at most once per step.

    The final step is first checked by one step of `step_fn` on a copy of the state
    (`next_batch()` gives its batch; the data position saved is the one before it)."""
    if self.saved == step:
      return
    data = self.loader.get_state()
    if step == self.steps:
      self._check_final(step, state, step_fn, next_batch)
    self.checkpointer.save(step, state, {"step": step, "data": data,
                                         "pending": list(pending)})
    self.saved = self.unchecked = step
    if step == self.steps:
      self.unchecked = None  # checked before it was written

  def _check_final(self, step: int, state: Any, step_fn: Callable,
                   next_batch: Callable[[], Any]) -> None:
    try:
      batch = next_batch()
    except StopIteration:  # a finite loader: nothing to check the final step on
      return
    # The step donates its input: it runs on a copy (one extra state in memory, briefly).
    _, metrics = step_fn(jax.tree.map(jnp.copy, state), batch)
    self.check(step + 1, metrics, probe=True)

  def should_stop(self, step: int) -> bool:
    """Whether a preemption was requested (see Checkpointer.should_stop)."""
    return self.checkpointer.should_stop(step)

  def preempt(self, step: int, state: Any, step_fn: Callable, next_batch: Callable[[], Any],
              pending: Sequence[str] = ()) -> None:
    """Saves step `step` (unless already saved) and raises checkpoint.Preempted."""
    self.save(step, state, step_fn, next_batch, pending)
    message = (f"[{self.name}] preempted: saved step {step}; rerun the same command to "
               "resume.")
    parallel.print0(message)
    raise ckpt_lib.Preempted(message, step)
