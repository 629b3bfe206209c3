"""Repeated identical blocks as one `nn.scan` (stacked parameters, one traced body).

A paper prior repeats the same block 20 times in each of its stacks (gated layers, output
blocks, conditioning blocks). Unrolled, every repetition is its own piece of the compiled
program: TPU compile time and program size grow with depth, and with rematerialisation
the unrolled chain of fusions overflowed the TPU compiler's stack (a SIGSEGV at the
default 8 MB limit). Under `nn.scan` the block is traced and compiled once, as the body of
a loop, whatever the depth (maxtext's `scan_layers`).

Parameters of a scanned stack carry a leading [length] axis (logical name 'layers',
never sharded); the prior's decoding step scans over them the same way
(`models/prior_decoding_scanned.py`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from vqvae2_jax.models.names import REMAT_NONE
from vqvae2_jax.models.remat import REMAT_POLICIES, check_mode

# Logical names of the stacked-parameter axes (mapped to no mesh axis): one for a stack,
# another for a stack nested in a stack's body (flax refuses a name twice in one array).
LAYER_AXIS = "layers"
NESTED_LAYER_AXIS = "sublayers"


def scan_stack(block_cls: type[nn.Module], *, length: int, remat: str,
               broadcast_args: int, axis: str = LAYER_AXIS) -> Any:
  """`block_cls` applied `length` times in a row, as one scanned module class.

  Args:
    block_cls: a Module whose __call__(carry, *broadcast) returns (carry, None); its
      carry is the residual stream(s), the broadcast arguments are read by every block.
    length: number of repetitions (each with its own parameters and dropout key).
    remat: 'none' | 'block': 'block' recomputes each repetition in the backward pass
      (only the carry between blocks is saved).
    broadcast_args: how many positional arguments after the carry every block shares.
    axis: logical name of the stacked axis (NESTED_LAYER_AXIS inside another scan).

  Returns:
    A Module class with the same constructor as block_cls and the same call signature.
  """
  check_mode(remat)
  if remat != REMAT_NONE:
    # prevent_cse=False: inside a scan the loop already keeps XLA from merging the
    # recomputation with the forward pass (the flax / jax guidance for scanned remat).
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return nn.scan(block_cls, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * broadcast_args, length=length,
                 metadata_params={nn.PARTITION_NAME: axis})
