"""Params-only restore of trained stages for inference.

Inference (extract, classifier scoring, sample, evaluate, the Python API) reads only the
arrays it runs: the parameters that serve inference (the parameter EMA when the stage kept
one, `Workdir.inference_params_key`) and, for stage 1, the codebook state. The optimizer
state is never built or read, so a restore costs the memory of the model, not ~3x it.
Full-state restore (`restore_train_state`) is for resuming and inspecting training.
Arrays land in the shardings of the ambient mesh and logical axis rules
(`parallel.use_mesh`).
"""
from __future__ import annotations

from typing import Any

import jax

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import parallel
from vqvae2_jax.builders import InitFn
from vqvae2_jax.train import state as state_lib
from vqvae2_jax.workdir import Workdir


def abstract_variables(init_fn: InitFn) -> tuple[Any, dict[str, Any]]:
  """(abstract params, abstract other collections), each a tree of ShapeDtypeStructs
  carrying the shardings training used (params by logical axis names, the rest
  replicated). Nothing is allocated."""
  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  param_shardings = parallel.logical_shardings(boxed["params"])
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        parallel.unboxed(boxed["params"]), param_shardings)
  replicated = parallel.replicated()
  rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      parallel.unboxed({k: v for k, v in boxed.items() if k != "params"}))
  return params, rest


def restore_inference_variables(workdir: Workdir, stage: str, init_fn: InitFn,
                                step: int | None = None
                                ) -> tuple[dict[str, Any], int]:
  """Flax variables {'params': ..., <other collections>} of a trained stage, and its step.

  Reads only the inference parameters and the non-trained collections (e.g. stage 1's
  EMA codebooks) of the latest (or given) checkpoint, into the shardings of the ambient mesh.
  Raises StageMissingError when the stage has no checkpoint, CheckpointError when the
  checkpoint does not match the recorded model or cannot be read.
  """
  step = workdir.latest_step(stage) if step is None else step
  params, rest = abstract_variables(init_fn)
  key = workdir.inference_params_key(stage)
  target = {key: params}
  if rest:
    target["model_state"] = rest
  checkpointer = ckpt_lib.Checkpointer(workdir.checkpoint_dir(stage), keep=None)
  try:
    # Errors name <workdir>/<stage>/checkpoints/<step>, and keep their class
    # (CorruptCheckpointError carries the step and the fallback for the CLI's message).
    restored, _ = checkpointer.restore_partial(target, step)
  finally:
    checkpointer.close()
  return {"params": restored[key], **restored.get("model_state", {})}, step


def restore_train_state(workdir: Workdir, stage: str, init_fn: InitFn, train_config,
                        step: int | None = None
                        ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """The whole train state (optimizer moments included) of a stage, and its record.

  For resuming and inspecting training only (e.g. comparing two runs' optimizer
  states); inference uses `restore_inference_variables`, which reads a third of it.
  """
  tx = state_lib.make_optimizer(train_config)
  _, abstract, shardings = state_lib.plan_state(init_fn, tx, train_config.param_ema_decay > 0)
  checkpointer = ckpt_lib.Checkpointer(workdir.checkpoint_dir(stage), keep=None)
  try:
    return checkpointer.restore(state_lib.abstract_with_shardings(abstract, shardings),
                                step)
  finally:
    checkpointer.close()
