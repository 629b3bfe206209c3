"""Deterministic, resumable, per-process batches from an `ImageSource`.

Batch order. For epoch e, let `perm_e = np.random.default_rng([seed, e])
.permutation(len(source))` (or `arange` with shuffle=False). Global batch t of
epoch e is `perm_e[t*g : (t+1)*g]` (g = global batch size; the last partial
batch of an epoch is dropped, so `steps_per_epoch = len(source) // g`).
Process p of P takes the contiguous slice `[p*b, (p+1)*b)` of it, b = g // P,
so the processes' batches concatenated in process order are exactly the
single-process global batch. Items are fetched with `source.get(i, epoch=e)`.

The position (epoch, step of the next batch) is the whole state: `get_state()`
after k batches and `set_state()` on a fresh loader continue with exactly the
batches the uninterrupted loader would have produced.

Decoding runs in a thread pool (PIL releases the GIL while decoding and
resizing) and the next batch is submitted before the current one is returned,
so decoding overlaps the training step.
"""
from __future__ import annotations

import concurrent.futures as cf
import math
from typing import Any, Iterator, Optional

import numpy as np

from vqvae2_jax.data.errors import DataError


def _process_layout(global_batch_size: int, process_index: Optional[int],
                    process_count: Optional[int]) -> tuple[int, int, int]:
  """Returns (process_index, process_count, per-process batch size)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in "
                     f"[0, process_count={process_count}).")
  if global_batch_size < 1:
    raise ValueError(f"global batch size {global_batch_size} must be >= 1.")
  if global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the "
        f"{process_count} processes; choose a multiple of {process_count}.")
  return process_index, process_count, global_batch_size // process_count


def _collect(futures: list[cf.Future]) -> tuple[np.ndarray, np.ndarray]:
  """Waits for (image, label) futures; returns uint8 [b,S,S,3], int32 [b]."""
  items = [f.result() for f in futures]
  images = np.stack([np.asarray(im, dtype=np.uint8) for im, _ in items])
  labels = np.asarray([lab for _, lab in items], dtype=np.int32)
  return images, labels


class BatchLoader:
  """Deterministic, resumable, per-process batches of a global batch.

  Iterating yields dicts {'image': uint8 [b, S, S, 3], 'label': int32 [b]},
  b = global_batch_size // process_count, forever (epoch after epoch).
  """

  def __init__(self, source, global_batch_size: int, *, seed: int,
               shuffle: bool = True, process_index: Optional[int] = None,
               process_count: Optional[int] = None, num_threads: int = 4):
    """Creates the loader at position (epoch 0, step 0).

    Args:
      source: an `ImageSource`.
      global_batch_size: items per step over all processes.
      seed: seeds the per-epoch permutations (a non-negative int).
      shuffle: permute each epoch; False keeps index order.
      process_index: this process; default `jax.process_index()`.
      process_count: number of processes; default `jax.process_count()`.
      num_threads: decoding threads.

    Raises:
      ValueError: bad batch size / process layout / thread count.
      DataError: the source holds fewer items than one global batch.
    """
    self.source = source
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count, self.batch_size = _process_layout(
        self.global_batch_size, process_index, process_count)
    if int(seed) < 0:
      raise ValueError(f"seed={seed} must be a non-negative int.")
    if num_threads < 1:
      raise ValueError(f"num_threads={num_threads} must be >= 1.")
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.num_items = len(source)
    self.steps_per_epoch = self.num_items // self.global_batch_size
    if self.steps_per_epoch < 1:
      raise DataError(
          f"The data source holds {self.num_items} items, fewer than one global "
          f"batch of {self.global_batch_size}; lower the batch size or add data.")
    self._epoch = 0
    self._step = 0
    self._perm_epoch = -1
    self._perm = np.arange(0)
    self._pending: Optional[tuple[int, int, list[cf.Future]]] = None
    self._pool: Optional[cf.ThreadPoolExecutor] = cf.ThreadPoolExecutor(
        num_threads, thread_name_prefix="vqvae2_data")

  def permutation(self, epoch: int) -> np.ndarray:
    """int64 [len(source)]: the item order of `epoch`."""
    if epoch != self._perm_epoch:
      if self.shuffle:
        self._perm = np.random.default_rng([self.seed, epoch]).permutation(
            self.num_items)
      else:
        self._perm = np.arange(self.num_items)
      self._perm_epoch = epoch
    return self._perm

  def indices(self, epoch: int, step: int) -> np.ndarray:
    """int64 [b]: the source indices of this process's batch (epoch, step)."""
    start = step * self.global_batch_size + self.process_index * self.batch_size
    return self.permutation(epoch)[start:start + self.batch_size]

  def _submit(self, epoch: int, step: int) -> tuple[int, int, list[cf.Future]]:
    if self._pool is None:
      raise RuntimeError("BatchLoader is closed.")
    futures = [self._pool.submit(self.source.get, int(i), epoch)
               for i in self.indices(epoch, step)]
    return epoch, step, futures

  def _cancel_pending(self) -> None:
    if self._pending is not None:
      for f in self._pending[2]:
        f.cancel()
      self._pending = None

  def _following(self, epoch: int, step: int) -> tuple[int, int]:
    step += 1
    if step == self.steps_per_epoch:
      return epoch + 1, 0
    return epoch, step

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch: {'image': uint8 [b, S, S, 3], 'label': int32 [b]}."""
    here = (self._epoch, self._step)
    if self._pending is None or self._pending[:2] != here:
      self._cancel_pending()
      self._pending = self._submit(*here)
    current = self._pending
    after = self._following(*here)
    # Prefetch: queue the next batch behind this one before waiting.
    self._pending = self._submit(*after)
    images, labels = _collect(current[2])
    self._epoch, self._step = after  # only once the batch really arrived
    return {"image": images, "label": labels}

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable position of the NEXT batch: {'epoch', 'step'}."""
    return {"epoch": int(self._epoch), "step": int(self._step)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position saved by `get_state` (drops any prefetched batch)."""
    try:
      epoch, step = int(state["epoch"]), int(state["step"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"loader state {state!r} needs int 'epoch' and 'step'.") from e
    if epoch < 0 or not 0 <= step < self.steps_per_epoch:
      raise ValueError(
          f"loader state {state!r} is out of range: steps_per_epoch="
          f"{self.steps_per_epoch} (did the dataset or batch size change?).")
    self._cancel_pending()
    self._epoch, self._step = epoch, step

  def close(self) -> None:
    """Stops the decoding threads; the loader cannot be used afterwards."""
    self._cancel_pending()
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None

  def __enter__(self) -> "BatchLoader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def iterate_once(source, global_batch_size: int, *,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Every item exactly once in index order, for extraction / evaluation.

  Global batch t holds positions [t*g, (t+1)*g) of range(len(source)); process
  p takes positions [t*g + p*b, t*g + (p+1)*b). Positions >= len(source) in
  the last global batch are padding: image zeros, label 0, index -1,
  valid False, so every process gets the same number of full batches.
  Items are read with epoch=0.

  Args:
    source: an `ImageSource`.
    global_batch_size: items per step over all processes.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.
    num_threads: decoding threads.

  Yields:
    {'image': uint8 [b, S, S, 3], 'label': int32 [b], 'index': int64 [b],
     'valid': bool [b]}.
  """
  p, _, b = _process_layout(int(global_batch_size), process_index, process_count)
  g = int(global_batch_size)
  n = len(source)
  if n < 1:
    raise DataError("The data source is empty; nothing to iterate over.")
  num_batches = math.ceil(n / g)
  pad_image: list[np.ndarray] = []  # filled lazily: the shape of one item

  def positions(t: int) -> np.ndarray:
    return t * g + p * b + np.arange(b, dtype=np.int64)

  pool = cf.ThreadPoolExecutor(num_threads, thread_name_prefix="vqvae2_once")

  def submit(t: int) -> list[cf.Future]:
    return [pool.submit(source.get, int(i), 0) for i in positions(t) if i < n]

  try:
    pending = submit(0)
    for t in range(num_batches):
      current = pending
      pending = submit(t + 1) if t + 1 < num_batches else []
      pos = positions(t)
      valid = pos < n
      num_valid = int(valid.sum())  # valid positions come first in the slice
      if num_valid:
        images, labels = _collect(current)
      else:
        images = np.zeros((0,), np.uint8)
        labels = np.zeros((0,), np.int32)
      if num_valid < b:
        if not pad_image:
          pad_image.append(np.zeros_like(
              images[0] if num_valid else np.asarray(source.get(0, 0)[0], np.uint8)))
        pad = np.broadcast_to(pad_image[0], (b - num_valid,) + pad_image[0].shape)
        images = np.concatenate([images.reshape((-1,) + pad_image[0].shape), pad])
        labels = np.concatenate([labels, np.zeros(b - num_valid, np.int32)])
      yield {"image": images, "label": labels,
             "index": np.where(valid, pos, -1).astype(np.int64), "valid": valid}
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
