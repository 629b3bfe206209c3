"""Code shards written by the `extract` stage, and batches of them for prior training.

Layout under `<workdir>/extract/`:
  manifest.json                      levels, shapes, codebook size, stage-1 step, splits
  <split>/shard_00000.<level>.npy    uint8/uint16/int32 [n, H_l, W_l] per level
  <split>/shard_00000.label.npy      int32 [n]
  <split>/shard_00000.index.npy      int64 [n], the image index in the split
Local shards are memory-mapped, so a split larger than RAM (ImageNet) trains without
loading; shards in a bucket (`vqvae2_jax.storage`) are read whole into memory.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Iterator, Optional

import grain
import numpy as np

from vqvae2_jax import storage
from vqvae2_jax.data.errors import DataError
from vqvae2_jax.data.loader import BatchLoader, _process_layout, grain_iterator

MANIFEST = "manifest.json"


def code_dtype(num_codes: int) -> np.dtype:
  """The smallest unsigned dtype that holds codes in [0, num_codes)."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if num_codes - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f"num_codes={num_codes} is too large")


def shard_prefix(extract_dir: str, split: str, shard: int) -> str:
  """Path prefix of one shard's files: <extract_dir>/<split>/shard_00000."""
  return storage.join(extract_dir, split, f"shard_{shard:05d}")


def write_shard(extract_dir: str, split: str, shard: int, arrays: dict[str, np.ndarray]):
  """Writes one shard's arrays, each .npy whole or not at all (`storage.save_npy`)."""
  prefix = shard_prefix(extract_dir, split, shard)
  storage.makedirs(storage.dirname(prefix))
  for key, value in arrays.items():
    storage.save_npy(f"{prefix}.{key}.npy", value)


def shard_complete(extract_dir: str, split: str, shard: int, keys) -> bool:
  """True when every array of the shard is on disk (interrupted runs skip it)."""
  prefix = shard_prefix(extract_dir, split, shard)
  return all(storage.exists(f"{prefix}.{k}.npy") for k in keys)


def read_manifest(extract_dir: str) -> dict:
  """The extraction manifest; a clear error when `extract` has not run."""
  path = storage.join(extract_dir, MANIFEST)
  if not storage.exists(path):
    raise DataError(f"no code shards at {extract_dir} (missing {MANIFEST}): run the "
                    "'extract' stage with the same --workdir first")
  return json.loads(storage.read_text(path))


class CodeShards:
  """Random access to the extracted codes of one split.

  take(indices) -> {'<level>': [b, H_l, W_l] int32 for each level, 'label': int32 [b]}.
  """

  def __init__(self, extract_dir: str, split: str):
    self.manifest = read_manifest(extract_dir)
    self.levels = tuple(self.manifest["levels"])
    if split not in self.manifest["splits"]:
      raise DataError(f"split {split!r} was not extracted to {extract_dir}; it has "
                      f"{sorted(self.manifest['splits'])}")
    count = self.manifest["splits"][split]["num_shards"]
    self._shards = []
    for shard in range(count):
      prefix = shard_prefix(extract_dir, split, shard)
      try:
        self._shards.append({k: storage.load_npy(f"{prefix}.{k}.npy")
                             for k in self.levels + ("label",)})
      except (OSError, ValueError) as e:
        raise DataError(f"code shard {prefix}.*.npy is missing or corrupt ({e}); rerun "
                        "the 'extract' stage") from e
    sizes = [len(s["label"]) for s in self._shards]
    self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.num_classes = int(self.manifest.get("num_classes", 0))

  def __len__(self) -> int:
    return int(self._starts[-1])

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Codes and labels of `indices` (any order), as int32 arrays."""
    indices = np.asarray(indices, np.int64)
    shard_of = np.searchsorted(self._starts, indices, side="right") - 1
    out = {k: np.empty((len(indices),) + self._shards[0][k].shape[1:], np.int32)
           for k in self.levels + ("label",)}
    for s in np.unique(shard_of):
      rows = np.nonzero(shard_of == s)[0]
      local = indices[rows] - self._starts[s]
      for k in out:
        out[k][rows] = self._shards[s][k][local]
    return out


def _take(codes: CodeShards, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
  indices, _ = batch  # (indices int [b], epochs int [b]); codes have no augmentation
  return codes.take(indices)


class CodeLoader(BatchLoader):
  """BatchLoader's order, process split and resumable position, over code shards.

  Batches are gathered from the memory-mapped shards in this process (a gather is
  far cheaper than a JPEG decode, and worker processes would copy the maps).
  """

  def __init__(self, codes: CodeShards, global_batch_size: int, *, seed: int, **kwargs):
    super().__init__(codes, global_batch_size, seed=seed, num_threads=1, **kwargs)

  def _per_process_batches(self, stream):
    return stream.batch(self.batch_size, drop_remainder=True).map(
        functools.partial(_take, self.source))


def _take_padded(codes: CodeShards, indices: np.ndarray,
                 positions: np.ndarray) -> dict[str, np.ndarray]:
  valid = positions < len(indices)
  batch = codes.take(indices[np.where(valid, positions, 0)])
  batch["valid"] = valid
  return batch


def iterate_codes_once(codes: CodeShards, global_batch_size: int, *,
                       indices: Optional[np.ndarray] = None,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None
                       ) -> Iterator[dict[str, np.ndarray]]:
  """Every item (or every one of `indices`) once in order, last batch padded.

  Batch t of process p holds positions [t*g + p*b, t*g + (p+1)*b) of `indices`
  (padding repeats item indices[0]); adds 'valid': bool [b] marking the padding.
  """
  p, count, b = _process_layout(global_batch_size, process_index, process_count)
  indices = np.arange(len(codes)) if indices is None else np.asarray(indices, np.int64)
  n = len(indices)
  positions = grain.MapDataset.range(math.ceil(n / global_batch_size) * global_batch_size)
  batches = positions.batch(b)[p::count].map(
      functools.partial(_take_padded, codes, indices))
  for batch in grain_iterator(batches, num_threads=1, worker_count=0):
    yield batch
