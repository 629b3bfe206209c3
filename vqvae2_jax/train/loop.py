"""The training loop every stage runs: sharded init, jitted step, resume, eval, save.

A stage describes itself with a `TrainTask` (how to init variables, the loss, its data,
optional evaluation and pictures); this loop owns everything else, so checkpointing,
resumption, SIGTERM handling and NaN handling are one piece of code for all stages
(the checkpoint policy itself: `train.guard`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import parallel
from vqvae2_jax import plots
from vqvae2_jax import registry
from vqvae2_jax.train import state as state_lib
from vqvae2_jax.train.guard import CheckpointGuard, NonFiniteLossError  # noqa: F401
from vqvae2_jax.train.step import jit_train_step, make_train_step  # noqa: F401
from vqvae2_jax.train.writer import MetricWriter


@dataclasses.dataclass
class TrainTask:
  """What a stage supplies to `train`.

  init_variables: rng -> Flax variables (params possibly boxed with logical names).
  loss_fn: (params, model_state, batch, rng) -> (loss, (metrics, new_model_state)),
    traced under jit; batch holds global arrays from `loader`.
  loader: iterator of host-local numpy batches with get_state()/set_state().
  evaluate: optional (state) -> dict of validation metrics (host floats).
  pictures: optional (state, step) -> None, writes image grids.
  progress_keys: metric names shown on the progress line.
  throughput_name / throughput_per_example: the throughput figure's name and how many
    counted units (images, latents) one batch row holds.
  finalize_state: combines the microbatches' model states under gradient accumulation
    (`train.step.FinalizeState`; e.g. stage 1's EMA codebook step over the whole batch).
  on_log: optional (step, row) -> None, called after each train log with the written row
    (e.g. stage 1's low-code-usage warning).
  """
  name: str
  init_variables: Callable[[jax.Array], dict]
  loss_fn: Callable[..., Any]
  loader: Iterator[dict[str, np.ndarray]]
  evaluate: Callable[[state_lib.TrainState], dict[str, float]] | None = None
  pictures: Callable[[state_lib.TrainState, int], None] | None = None
  progress_keys: tuple[str, ...] = ("loss",)
  throughput_name: str = "images_per_sec"
  throughput_per_example: int = 1
  finalize_state: Callable[..., Any] | None = None
  on_log: Callable[[int, dict], None] | None = None


def train(task: TrainTask, train_config, *, directory: str, checkpoint_dir: str,
          seed: int) -> state_lib.TrainState:
  """Trains `task` to train_config.steps, resuming from `checkpoint_dir` if it holds a step.

  Runs inside `parallel.use_mesh`: the state is sharded on the ambient mesh under the
  ambient logical axis rules, and the step is traced with the models' activations pinned
  batch-sharded (models/sharding.py).

  Args:
    task: the stage's TrainTask.
    train_config: the stage's train section (batch_size, steps, optimiser, cadences).
    directory: the stage folder (metrics.jsonl, curves.png, tensorboard/).
    checkpoint_dir: the stage's checkpoint folder (`Workdir.checkpoint_dir`).
    seed: initialisation and step-key seed.
  """
  parallel.check_batch_size(train_config.batch_size, f"{task.name} batch_size")
  tx = state_lib.make_optimizer(train_config)
  use_ema = train_config.param_ema_decay > 0
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, keep=train_config.keep_checkpoints)
  # From here on SIGTERM asks for a save-and-exit: initialisation, restore and the first
  # compile included (the handler runs when control returns to Python).
  checkpointer.install_sigterm_handler()
  guard = CheckpointGuard(task.name, checkpointer, task.loader, train_config.steps,
                          train_config.learning_rate)
  writer = None
  try:
    state, shardings = state_lib.init_sharded_state(
        task.init_variables, tx, jax.random.PRNGKey(seed), use_ema)
    writer = MetricWriter(directory, total_steps=train_config.steps, name=task.name)
    start, pending = 0, []
    resumed = guard.resume(state_lib.abstract_with_shardings(state, shardings))
    if resumed is not None:
      state, record = resumed
      task.loader.set_state(record["data"])
      start, pending = int(record["step"]), list(record.get("pending", []))
      writer.truncate_after(start)
      parallel.print0(f"[{task.name}] resumed from step {start} ({checkpointer.directory})")
  except BaseException:
    if writer is not None:
      writer.close()
    checkpointer.close()
    raise

  step_fn = jit_train_step(task.loss_fn, tx, train_config, shardings,
                           parallel.batch_sharding(), task.finalize_state)

  next_batch = lambda: parallel.host_to_global(next(task.loader))

  def due_work(step: int) -> list[str]:
    """Evaluation and pictures due after step `step`, in the order they run."""
    final = step == train_config.steps
    work = []
    if task.evaluate is not None and (
        (train_config.eval_every and step % train_config.eval_every == 0) or final):
      work.append("evaluate")
    if task.pictures is not None and (
        (train_config.image_every and step % train_config.image_every == 0) or final):
      work.append("pictures")
    return work

  def run_work(state, step: int, work: list[str]) -> None:
    """Runs `work` in order; on a preemption request saves with the rest still pending."""
    for i, kind in enumerate(work):
      if guard.should_stop(step):
        guard.preempt(step, state, step_fn, next_batch, pending=work[i:])
      if kind == "evaluate":
        row = writer.write(step, task.evaluate(state), split=registry.VAL)
        writer.progress(step, row, tuple(k for k in row if k not in ("step", "split")))
      else:
        task.pictures(state, step)

  window_start, window_steps = time.time(), 0
  step = start
  try:
    run_work(state, step, pending)  # what a preempted run left undone at its last step
    while step < train_config.steps:
      if guard.should_stop(step):  # SIGTERM during initialisation, restore or last save
        guard.preempt(step, state, step_fn, next_batch)
      state, metrics = step_fn(state, next_batch())
      step += 1
      window_steps += 1
      # One host sync per step on the loss and gradient norm: a non-finite value stops
      # the run before these parameters are saved, and rolls back a checkpoint of the
      # parameters that produced it.
      guard.check(step, metrics)
      if step % train_config.log_every == 0 or step == train_config.steps:
        elapsed = time.time() - window_start
        host = jax.tree.map(np.asarray, jax.device_get(metrics))
        host["step_time"] = elapsed / window_steps
        host[task.throughput_name] = (window_steps * train_config.batch_size
                                      * task.throughput_per_example / elapsed)
        row = writer.write(step, host)
        writer.progress(step, row, task.progress_keys + (task.throughput_name,))
        if task.on_log is not None:
          task.on_log(step, row)
        window_start, window_steps = time.time(), 0
      run_work(state, step, due_work(step))
      if guard.should_stop(step):
        guard.preempt(step, state, step_fn, next_batch)
      if step % train_config.checkpoint_every == 0 or step == train_config.steps:
        guard.save(step, state, step_fn, next_batch)
    if guard.should_stop(step):  # SIGTERM during the final save: it is complete
      guard.preempt(step, state, step_fn, next_batch)
  finally:
    writer.close()
    checkpointer.close()
  if jax.process_index() == 0 and step > start:
    plots.plot_training_curves(directory)
  return state

