"""Activation sharding: every block's outputs pinned to the batch-sharded layout.

Parameters carry logical axis names (e.g. 'mlp' -> the 'fsdp' mesh axis); activations
carry none, so under fsdp > 1 XLA's sharding propagation may follow a sharded kernel and
split an activation over channels instead of the batch, moving whole activations between
devices and keeping several layouts alive (2-5x temporary memory in
benchmarks/memory_plan.py). `constrain_batch` states the intended layout at each block
boundary: batch split over the 'batch' logical axis (('data', 'fsdp') by default), every
other dimension whole, so each device computes on its own examples and only the
parameters move (all-gathered per layer, gradients reduce-scattered).

It is `flax.linen.with_logical_constraint`, a no-op unless the caller traces inside
`flax.linen.logical_axis_rules(rules)` and a mesh context (`parallel.use_mesh` enters both,
around every stage and every `api.Run` method).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax


def constrain_batch(tree: Any) -> Any:
  """Every array of `tree` ([B, ...]) constrained to ('batch', None, ...)."""
  return jax.tree.map(
      lambda x: nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
      if getattr(x, "ndim", 0) else x, tree)


def batch_sharded(fn: Callable) -> Callable:
  """fn with `constrain_batch` applied to its outputs."""
  return lambda *args, **kwargs: constrain_batch(fn(*args, **kwargs))
