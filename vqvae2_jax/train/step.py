"""The one jitted training update, with optional gradient accumulation.

`make_train_step(loss_fn, tx, ema_decay, grad_accum_steps=A)` splits each global batch
[B, ...] into A microbatches of B / A rows (B / A / devices per device), runs the loss and
its gradient on each in a `lax.scan` (so only one microbatch's activations are alive at a
time), averages losses, metrics and gradients, and applies one optimizer update: for losses
that are means over equal-sized microbatches this is the update of one step on the whole
batch, at about 1/A of its activation memory.

Model state (e.g. the VQ-VAE's EMA codebooks) must also see the whole batch. Every
microbatch's loss gets the step's starting model state; the states they return are stacked
on a leading [A] axis and handed to `finalize_state`, which turns them into the next model
state (the VQ-VAE's sums the microbatches' code statistics and applies one EMA step,
`models.vqvae.finalize_codebooks`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from vqvae2_jax.train import state as state_lib

# (params, model_state, microbatch_states [A, ...], rng) -> new model_state
FinalizeState = Callable[[Any, Any, Any, jax.Array], Any]


def split_microbatches(batch: dict[str, jax.Array], num: int) -> dict[str, jax.Array]:
  """[B, ...] arrays -> [num, B / num, ...]; microbatch i holds rows i, i+num, i+2 num, ...

  The strided split keeps every microbatch spread evenly over the devices the batch axis is
  sharded on (a contiguous split would put microbatch 0 on the first devices only).
  """
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into grad_accum_steps="
                       f"{num} microbatches; make batch_size a multiple of grad_accum_steps "
                       "times the number of devices")
    return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _keep_single_state(params, model_state, microbatch_states, rng):
  """Default finalize: the one microbatch's new state (no accumulation)."""
  del params, model_state, rng
  return jax.tree.map(lambda a: a[0], microbatch_states)


def accumulated_grads(loss_fn, params, model_state, batch, rng, num: int):
  """Mean loss, metrics and grads over `num` microbatches, and their stacked model states.

  Returns (loss, metrics, grads, microbatch_states with a leading [num] axis). num == 1 is
  the plain value_and_grad on the whole batch with `rng` itself.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num == 1:
    (loss, (metrics, new_state)), grads = grad_fn(params, model_state, batch, rng)
    return loss, metrics, grads, jax.tree.map(lambda a: a[None], new_state)

  def body(totals, xs):
    i, micro = xs
    (loss, (metrics, new_state)), grads = grad_fn(params, model_state, micro,
                                                  jax.random.fold_in(rng, i))
    totals = jax.tree.map(lambda t, x: t + x.astype(t.dtype), totals, (loss, metrics, grads))
    return totals, new_state

  micro = split_microbatches(batch, num)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grad_fn, params, model_state, first, rng)
  (loss_s, (metrics_s, _)), grads_s = shapes
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                       (loss_s, metrics_s, grads_s))
  totals, states = jax.lax.scan(body, zeros, (jnp.arange(num), micro))
  loss, metrics, grads = jax.tree.map(lambda t: t / num, totals)
  grads = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, grads_s)
  return loss, metrics, grads, states


def make_train_step(loss_fn, tx, ema_decay: float, grad_accum_steps: int = 1,
                    finalize_state: FinalizeState | None = None):
  """The update: grads (accumulated over microbatches), optimizer, model state, param EMA.

  Args:
    loss_fn: (params, model_state, batch, rng) -> (loss, (metrics, new_model_state)).
    tx: the optax optimizer.
    ema_decay: decay of the parameter EMA (0 = off).
    grad_accum_steps: A microbatches per step (see the module docstring); metrics are
      means over microbatches (batch statistics such as perplexity are per microbatch).
    finalize_state: combines the microbatches' new model states (stacked [A, ...]) into the
      next one. None keeps the loss's state when A == 1 and requires an empty model state
      otherwise (an in-loss update of e.g. EMA codebooks cannot be combined).

  Returns:
    step(state, batch) -> (new_state, metrics), to be jitted by the caller.
  """
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

  def step(state: state_lib.TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    finalize = finalize_state
    if finalize is None:
      if grad_accum_steps > 1 and jax.tree.leaves(state.model_state):
        raise ValueError(
            f"grad_accum_steps={grad_accum_steps} with model state "
            f"{sorted(state.model_state)}: pass finalize_state so the whole batch updates it "
            "once (for the VQ-VAE: apply with mutable=['vq_batch'] and "
            "models.vqvae.finalize_codebooks)")
      finalize = _keep_single_state
    loss, metrics, grads, states = accumulated_grads(
        loss_fn, state.params, state.model_state, batch, rng, grad_accum_steps)
    model_state = finalize(state.params, state.model_state, states,
                           jax.random.fold_in(rng, grad_accum_steps))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay > 0:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state, ema_params=ema)
    return new_state, metrics
  return step


def jit_train_step(loss_fn, tx, train_config, shardings, batch_sharding,
                   finalize_state: FinalizeState | None = None):
  """The jitted update as the training loop runs it: `make_train_step` with the train
  config's EMA decay and grad_accum_steps, state in/out in `shardings` (donated), the
  batch in `batch_sharding`. Trace it inside `parallel.use_mesh`."""
  return jax.jit(make_train_step(loss_fn, tx, train_config.param_ema_decay,
                                 train_config.grad_accum_steps, finalize_state),
                 in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=0)
