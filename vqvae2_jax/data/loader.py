"""Deterministic, resumable, per-process batches from an `ImageSource`, on grain.

Batch order. Let g be the global batch size, n = len(source), and
`steps_per_epoch = n // g` (the last partial batch of an epoch is dropped). The
item order is grain's: `order = grain.MapDataset.range(n).shuffle(seed)` (no
shuffle: index order), whose position `e*n + k` is the k-th item of epoch e
(grain folds the epoch into the shuffle seed). Global batch t of epoch e holds
the items at epoch positions [t*g, (t+1)*g). Process p of P takes the contiguous
part [p*b, (p+1)*b), b = g // P, so the processes' batches concatenated in
process order are exactly the single-process global batch. Items are read with
`source.get(i, epoch=e)`, so augmenting sources (demo crops) differ per epoch.

The pipeline is a random-access `grain.MapDataset` up to the iterator, so the
position (epoch, step of the next batch) is the whole state: `get_state()`
after k batches and `set_state()` on a fresh loader continue with exactly the
batches the uninterrupted loader would have produced, whatever the number of
decode workers (grain's own multi-worker iterator state is tied to the worker
count). The state goes into the checkpoint's JSON record.

Decoding runs in grain: `num_threads` threads per process (PIL releases the GIL
while decoding), and with `worker_count` > 0 in that many worker processes
(`mp_prefetch`), each building whole per-process batches ahead of the step.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Optional

from absl import flags
import grain
import numpy as np

from vqvae2_jax.data.errors import DataError, skipped_items
from vqvae2_jax.data.sources import read_item

# grain's shuffle takes seeds in [0, 2**32).
MAX_SEED = 2**32 - 1


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


def _with_epoch(per_epoch: int, position: int, index: int) -> tuple[int, int]:
  return int(index), position // per_epoch


def epoch_stream(num_items: int, global_batch_size: int, *, seed: int,
                 shuffle: bool = True) -> grain.MapDataset:
  """Infinite grain dataset: flat position q -> (item index, epoch).

  Position q = e * steps_per_epoch * g + k is the k-th item of epoch e (see the
  module docstring); only whole global batches of an epoch are kept.
  """
  per_epoch = (num_items // global_batch_size) * global_batch_size
  order = grain.MapDataset.range(num_items)
  if shuffle:
    order = order.shuffle(seed=seed)
  # Slicing keeps the epoch: position e*per_epoch + k reads order[e*n + k].
  return order[:per_epoch].repeat().map_with_index(
      functools.partial(_with_epoch, per_epoch))


def _read(source, item: tuple[int, int]) -> dict[str, np.ndarray]:
  index, epoch = item
  image, label, skipped = read_item(source, index, epoch)
  return {"image": np.asarray(image, np.uint8), "label": np.int32(label),
          "skipped": skipped}


def allow_worker_processes() -> None:
  """grain's worker start reads an absl flag: outside an absl app (tests,
  notebooks) mark the flags parsed, or every worker fails to start."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def grain_iterator(batches: grain.MapDataset, *, num_threads: int,
                   worker_count: int) -> grain.DatasetIterator:
  """An iterator over `batches` with `num_threads` read threads per process and
  `worker_count` decode processes (0: decode in this process)."""
  if num_threads < 1:
    raise ValueError(f"num_threads={num_threads} must be >= 1.")
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count} must be >= 0 "
                     "(set --config.data.worker_count; 0 decodes in-process).")
  # Elements are whole batches: buffering one per thread keeps every thread busy
  # without holding hundreds of batches in memory (grain's default is 500).
  ds = batches.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=num_threads))
  if worker_count:
    allow_worker_processes()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


class BatchLoader:
  """Deterministic, resumable, per-process batches of a global batch.

  Iterating yields dicts {'image': uint8 [b, S, S, 3], 'label': int32 [b]},
  b = global_batch_size // process_count, forever (epoch after epoch).
  """

  def __init__(self, source, global_batch_size: int, *, seed: int,
               shuffle: bool = True, process_index: Optional[int] = None,
               process_count: Optional[int] = None, num_threads: int = 4,
               worker_count: int = 0):
    """Creates the loader at position (epoch 0, step 0); nothing is read yet.

    Args:
      source: an `ImageSource`.
      global_batch_size: items per step over all processes.
      seed: seeds the per-epoch shuffles (an int in [0, 2**32)).
      shuffle: shuffle each epoch; False keeps index order.
      process_index: this process; default `jax.process_index()`.
      process_count: number of processes; default `jax.process_count()`.
      num_threads: decoding threads per process (grain ReadOptions).
      worker_count: decoding worker processes (grain mp_prefetch); 0 decodes
        in this process (tests, notebooks). The source must pickle.

    Raises:
      ValueError: bad batch size / process layout / thread or worker count / seed.
      DataError: the source holds fewer items than one global batch.
    """
    self.source = source
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count, self.batch_size = _process_layout(
        self.global_batch_size, process_index, process_count)
    if not 0 <= int(seed) <= MAX_SEED:
      raise ValueError(f"seed={seed} must be an int in [0, 2**32).")
    if num_threads < 1:
      raise ValueError(f"num_threads={num_threads} must be >= 1.")
    if worker_count < 0:
      raise ValueError(f"worker_count={worker_count} must be >= 0.")
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.num_threads = int(num_threads)
    self.worker_count = int(worker_count)
    self.num_items = len(source)
    self.steps_per_epoch = self.num_items // self.global_batch_size
    if self.steps_per_epoch < 1:
      raise DataError(
          f"The data source holds {self.num_items} items, fewer than one global "
          f"batch of {self.global_batch_size}; lower the batch size or add data.")
    self._stream = epoch_stream(self.num_items, self.global_batch_size,
                                seed=self.seed, shuffle=self.shuffle)
    # Batch k of this process = chunk k*P + p of b consecutive stream positions.
    self._batches = self._per_process_batches(self._stream)[
        self.process_index::self.process_count]
    self._position = 0  # batches delivered: epoch * steps_per_epoch + step
    self._iter: Optional[grain.DatasetIterator] = None
    self._skipped: set[tuple[int, int]] = set()

  def _per_process_batches(self, stream: grain.MapDataset) -> grain.MapDataset:
    """Chunks of b consecutive stream positions, read (subclasses read otherwise)."""
    return stream.map(functools.partial(_read, self.source)).batch(
        self.batch_size, drop_remainder=True)

  def indices(self, epoch: int, step: int) -> np.ndarray:
    """int64 [b]: the source indices of this process's batch (epoch, step)."""
    start = ((epoch * self.steps_per_epoch + step) * self.global_batch_size
             + self.process_index * self.batch_size)
    return np.asarray([self._stream[q][0] for q in range(start, start + self.batch_size)],
                      np.int64)

  @property
  def num_skipped(self) -> int:
    """Distinct unreadable images skipped in the batches delivered so far
    (counted from every decode worker; on_bad_image='skip')."""
    return len(self._skipped)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch: {'image': uint8 [b, S, S, 3], 'label': int32 [b]}."""
    if self._iter is None:
      self._iter = grain_iterator(self._batches[self._position:],
                                  num_threads=self.num_threads,
                                  worker_count=self.worker_count)
    try:
      batch = next(self._iter)
    except BaseException:
      self.close()  # a later call restarts at the same position
      raise
    self._position += 1  # only once the batch really arrived
    skipped = batch.pop("skipped", None)
    if skipped is not None and skipped[:, 1].any():
      self._skipped |= skipped_items(skipped)
    # Plain arrays (grain's workers hand over shared-memory subclasses).
    return {k: np.asarray(v) for k, v in batch.items()}

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable position of the NEXT batch: {'epoch', 'step'}."""
    epoch, step = divmod(self._position, self.steps_per_epoch)
    return {"epoch": int(epoch), "step": int(step)}

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
    self.close()
    self._position = epoch * self.steps_per_epoch + step

  def close(self) -> None:
    """Stops grain's threads and worker processes; the next batch restarts them."""
    if self._iter is not None:
      it, self._iter = self._iter, None
      closer = getattr(it, "close", None)
      if closer is not None:
        closer()

  def __enter__(self) -> "BatchLoader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def _read_or_pad(source, num_items: int, pad: Optional[np.ndarray],
                 position: int) -> dict[str, np.ndarray]:
  if position < num_items:
    image, label = source.get(position, 0)
    return {"image": np.asarray(image, np.uint8), "label": np.int32(label),
            "index": np.int64(position), "valid": np.bool_(True)}
  return {"image": pad, "label": np.int32(0), "index": np.int64(-1),
          "valid": np.bool_(False)}


def iterate_once(source, global_batch_size: int, *,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 num_threads: int = 4,
                 worker_count: int = 0) -> Iterator[dict[str, np.ndarray]]:
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
    num_threads: decoding threads per process.
    worker_count: decoding worker processes (0: in this process).

  Yields:
    {'image': uint8 [b, S, S, 3], 'label': int32 [b], 'index': int64 [b],
     'valid': bool [b]}.
  """
  p, count, b = _process_layout(int(global_batch_size), process_index, process_count)
  g = int(global_batch_size)
  n = len(source)
  if n < 1:
    raise DataError("The data source is empty; nothing to iterate over.")
  num_batches = math.ceil(n / g)
  # The padding's shape is that of one item (read only when padding is needed).
  pad = (np.zeros_like(np.asarray(source.get(0, 0)[0], np.uint8))
         if num_batches * g > n else None)
  batches = grain.MapDataset.range(num_batches * g).map(
      functools.partial(_read_or_pad, source, n, pad)).batch(b)[p::count]
  it = grain_iterator(batches, num_threads=num_threads, worker_count=worker_count)
  try:
    for batch in it:
      yield {k: np.asarray(v) for k, v in batch.items()}
  finally:
    closer = getattr(it, "close", None)
    if closer is not None:
      closer()
