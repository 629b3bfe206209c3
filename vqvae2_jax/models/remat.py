"""Rematerialisation (gradient checkpointing) of residual / gated blocks.

`remat='block'` wraps each block's method in `nn.remat` with the named policy below:
only the block's inputs (and the attention weights, `SAVED_NAMES`) are kept for the
backward pass and everything else inside the block is recomputed, trading about one extra forward pass for the activations of the whole stack.
The method is lifted as `Cls.method(self, ...)`, so parameter paths (and checkpoints) are
identical with and without remat. Either way the block's outputs are pinned to the
batch-sharded layout (`models/sharding.py`; a no-op outside the train step's rules).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

from vqvae2_jax.models.names import REMAT_BLOCK, REMAT_MODES, REMAT_NONE
from vqvae2_jax.models.sharding import batch_sharded

# Saved, not recomputed, under remat: the attention weights (softmax output, float32
# [B, heads, N, N]). Recomputing them in the backward pass (scores matmul, mask, softmax)
# and fusing that chain into the dropout and the gradient matmuls overflowed XLA:TPU's
# stack (SIGSEGV in convolution fusion costing) at the default 8 MB limit; saving them
# costs what the un-remat'd step keeps and spares recomputing two [N, N] matmuls.
SAVED_NAMES = ("attention_weights",)
# The policy of each remat mode but REMAT_NONE (models/names.REMAT_MODES).
REMAT_POLICIES = {REMAT_BLOCK: jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)}


def check_mode(mode: str) -> None:
  """Raises a one-line error for an unknown remat mode."""
  if mode not in REMAT_MODES:
    raise ValueError(f"unknown remat mode {mode!r}; use one of {REMAT_MODES}")


def maybe_remat(method: Callable, mode: str, static_argnums: tuple[int, ...] = ()
                ) -> Callable:
  """`method` (an unbound Module method, called as f(module, *args)) under remat `mode`.

  static_argnums count `module` as argument 0 (Python values such as `train` flags). The
  outputs are batch-sharded (`models.sharding.batch_sharded`).
  """
  check_mode(mode)
  if mode == REMAT_NONE:
    return batch_sharded(method)
  return batch_sharded(nn.remat(method, policy=REMAT_POLICIES[mode],
                                static_argnums=static_argnums, prevent_cse=True))
