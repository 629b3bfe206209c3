"""Checksums of array trees that do not depend on how the arrays are sharded.

A checkpoint records one 64-bit checksum per array when it is saved and compares it with
the restored arrays: silent corruption of the files (a bad disk, a truncated copy, stray
bytes) then fails loudly instead of training or sampling from wrong weights.

The checksum of an array of shape S is

    sum over elements i of mix64(flat_index(i) * PHI + bits(x_i))   (mod 2**64)

where bits() is the element's bit pattern and mix64 the SplitMix64 finaliser (a bijection
on 64-bit words). Because it is a sum over elements keyed by their *global* position,
each process hashes only the shards it holds (one replica of each), on the host from
the bytes it copies off the device, and the partial sums add up to the same total
whatever the mesh: a checkpoint written on 8 devices verifies when restored onto 2, and
a multi-process save sums the per-process partials with one all-gather.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Iterable

import jax
import numpy as np

_MASK = (1 << 64) - 1
_PHI = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Elements hashed per NumPy pass: bounds the temporaries to a few MiB per array.
_CHUNK = 1 << 20
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
  """[('params/encoder/kernel', leaf), ...]: the names shape signatures and records use."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat]


def _element_bits(block: np.ndarray) -> np.ndarray:
  """The elements' bit patterns as unsigned integers, flattened in C order (a view)."""
  block = np.ascontiguousarray(block)
  if block.dtype.itemsize not in _UNSIGNED:
    raise TypeError(f"cannot checksum arrays of dtype {block.dtype}")
  return block.reshape(-1).view(_UNSIGNED[block.dtype.itemsize])


# PHI * (0, 1, 2, ...): the position keys of one chunk, offset per chunk by one addition.
_KEYS = np.arange(_CHUNK, dtype=np.uint64) * _PHI


def _mix_sum(z: np.ndarray, tmp: np.ndarray) -> int:
  """sum(mix64(z)) mod 2**64, in place in z (tmp: scratch of z's size)."""
  for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
    np.right_shift(z, np.uint64(shift), out=tmp)
    np.bitwise_xor(z, tmp, out=z)
    if mult is not None:
      np.multiply(z, mult, out=z)
  return int(z.sum(dtype=np.uint64))


def _contiguous_sum(bits: np.ndarray, first: int) -> int:
  """Hash sum of elements with global flat indices first, first + 1, ... (bits 1-D).

  Chunks run on a thread pool: NumPy's integer ufuncs release the GIL, so a host's cores
  share the pass (a save's checksums cost about one memory pass of the state per core)."""
  def chunk_sum(s: int) -> int:
    part = bits[s:s + _CHUNK]
    z = _KEYS[:part.size] + np.uint64(((first + s) * int(_PHI)) & _MASK)
    z += part
    return _mix_sum(z, np.empty_like(z))
  starts = range(0, bits.size, _CHUNK)
  if len(starts) < 2:
    return sum(map(chunk_sum, starts)) & _MASK
  return sum(_pool().map(chunk_sum, starts)) & _MASK


@functools.lru_cache(maxsize=1)
def _pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1),
                                               thread_name_prefix="checksum")


def _block_sum(block: np.ndarray, starts: tuple[int, ...], shape: tuple[int, ...]) -> int:
  """Sum of element hashes of `block`, the slice of a [shape] array starting at `starts`."""
  if block.ndim == 0:
    block, starts, shape = block.reshape(1), (0,), (1,)
  strides = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
  base = sum(s * st for s, st in zip(starts, strides))
  if tuple(block.shape[1:]) == tuple(shape[1:]):
    # Whole trailing dims (replicated, or split along the leading axis only): the block is
    # one run of consecutive global indices.
    return _contiguous_sum(_element_bits(block), base)
  # Global flat offsets of one leading-axis row of the block (dims 1..n-1).
  inner = np.zeros((), np.uint64)
  for length, stride in zip(block.shape[1:], strides[1:]):
    inner = inner[..., None] + np.arange(length, dtype=np.uint64) * np.uint64(stride)
  inner = inner.reshape(-1)
  rows_per_chunk = max(1, _CHUNK // max(1, inner.size))
  total = 0
  for r0 in range(0, block.shape[0], rows_per_chunk):
    rows = block[r0:r0 + rows_per_chunk]
    z = (np.arange(r0, r0 + rows.shape[0], dtype=np.uint64)[:, None] * np.uint64(strides[0])
         + np.uint64(base) + inner[None, :]).reshape(-1)
    z *= _PHI
    z += _element_bits(rows)
    total += _mix_sum(z, np.empty_like(z))
  return total & _MASK


def _local_sum(leaf: Any) -> int:
  """This process's share of a leaf's checksum: its replica-0 shards (all of a host array
  on process 0 only, so every element is counted exactly once over all processes)."""
  if isinstance(leaf, jax.Array):
    shards = [s for s in leaf.addressable_shards if s.replica_id == 0]
    blocks = jax.device_get([s.data for s in shards])  # the bytes orbax copies too
    starts = [tuple(sl.start or 0 for sl in s.index) for s in shards]
    return sum(_block_sum(np.asarray(b), st, leaf.shape)
               for b, st in zip(blocks, starts)) & _MASK
  if jax.process_index() != 0:
    return 0
  host = np.asarray(leaf)
  return _block_sum(host, (0,) * host.ndim, host.shape)


def _sum_over_processes(values: list[int]) -> list[int]:
  """Element-wise sum (mod 2**64) of each process's partial checksums."""
  if jax.process_count() == 1 or not values:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # uint64 travels as uint32 pairs: JAX arrays are 32-bit unless x64 is enabled.
  words = np.asarray(values, np.uint64).view(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(words))
  per_process = gathered.reshape(jax.process_count(), -1).astype(np.uint32)
  return [sum(int(v) for v in column) & _MASK
          for column in np.ascontiguousarray(per_process).view(np.uint64).T]


def tree_checksums(tree: Any) -> dict[str, str]:
  """{'params/encoder/kernel': '16 hex digits', ...} for every array leaf of `tree`.

  Collective when several processes hold the tree: every process must call it. The
  device arrays are copied to the host shard by shard (replica 0 only)."""
  paths = leaf_paths(tree)
  totals = _sum_over_processes([_local_sum(leaf) for _, leaf in paths])
  return {path: f"{total:016x}" for (path, _), total in zip(paths, totals)}


def mismatched(recorded: dict[str, str], tree: Any, only: Iterable[str] | None = None
               ) -> list[str]:
  """Paths of `tree` (or of `only`) whose checksum differs from `recorded`'s.

  Paths absent from `recorded` are not compared (the shape check covers structure)."""
  actual = tree_checksums(tree)
  names = actual if only is None else [p for p in only if p in actual]
  return [p for p in names if p in recorded and recorded[p] != actual[p]]
