"""grain decode workers: the same batches, resume and bad-image policy as in-process.

Worker processes are spawned (each imports the package), so these tests share one
xdist group and keep to a few small folders of PNGs.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
import pytest

from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data.errors import DataError
from vqvae2_jax.data.folders import FolderSource
from vqvae2_jax.data.loader import BatchLoader, iterate_once
from vqvae2_jax.data.sources import Subset

S = 8
pytestmark = pytest.mark.xdist_group("grain_workers")


def _folder(root, n, bad=()):
  """n PNGs in one class folder whose red channel spells the index; `bad` are junk."""
  d = root / "train" / "c"
  d.mkdir(parents=True)
  for i in range(n):
    path = d / f"{i:03d}.png"
    if i in bad:
      path.write_bytes(b"not a png")
    else:
      px = np.zeros((12, 10, 3), np.uint8)
      px[..., 0], px[..., 1] = i, 255 - i
      Image.fromarray(px).save(path)
  return str(root)


def _take(loader, k):
  return [next(loader) for _ in range(k)]


def _equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      assert type(y[key]) is np.ndarray and y[key].dtype == x[key].dtype
      np.testing.assert_array_equal(x[key], y[key])


def test_workers_deliver_the_in_process_batches_and_resume_across_worker_counts(tmp_path):
  src = FolderSource(_folder(tmp_path, 30), "train", S)

  def make(workers, process_index=1):
    return BatchLoader(src, 8, seed=5, process_index=process_index, process_count=2,
                       num_threads=2, worker_count=workers)

  reference = _take(make(0), 9)  # 3 steps per epoch: crosses two epoch boundaries
  with make(2) as two:
    _equal(reference[:5], _take(two, 5))
    state = json.loads(json.dumps(two.get_state()))
  assert state == {"epoch": 1, "step": 2}
  with make(1) as one:  # resumed with another worker count: the same batches
    one.set_state(state)
    _equal(reference[5:], _take(one, 4))
  # Process 0's part and process 1's part tile the single-process global batch.
  with make(2, process_index=0) as zero:
    first = next(zero)
  whole = next(BatchLoader(src, 8, seed=5, process_index=0, process_count=1,
                           worker_count=0))
  np.testing.assert_array_equal(
      np.concatenate([first["image"], reference[0]["image"]]), whole["image"])


def test_workers_apply_the_bad_image_policy(tmp_path):
  root = _folder(tmp_path, 12, bad=(3, 4, 9))
  strict = BatchLoader(FolderSource(root, "train", S), 12, seed=0, shuffle=False,
                       process_index=0, process_count=1, worker_count=1)
  with pytest.raises(DataError, match=r"003\.png.*on_bad_image=skip"):
    next(strict)
  assert strict.get_state() == {"epoch": 0, "step": 0}  # position not advanced
  strict.close()
  skip = FolderSource(root, "train", S, on_bad_image="skip")
  with BatchLoader(skip, 4, seed=1, process_index=0, process_count=1,
                   worker_count=2) as loader:
    batches = _take(loader, 6)  # two epochs of 3 batches: every file read twice
    assert loader.num_skipped == 3  # distinct bad files, counted across workers
  assert skip.num_skipped == 0  # the main process decoded nothing itself
  reds = np.concatenate([b["image"][:, 0, 0, 0] for b in batches[:3]])
  assert not set(reds.tolist()) & {3, 4, 9}  # the next readable file instead
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), 0)


def test_iterate_once_with_workers_equals_in_process(tmp_path):
  src = Subset(FolderSource(_folder(tmp_path, 21), "train", S), np.arange(1, 21))
  for p in range(2):
    here = list(iterate_once(src, 8, process_index=p, process_count=2, worker_count=0))
    there = list(iterate_once(src, 8, process_index=p, process_count=2, worker_count=2))
    _equal(here, there)
    assert len(here) == 3 and here[0]["image"].shape == (4, S, S, 3)
  last = here[-1]  # process 1, positions 20..23: all padding
  assert not last["valid"].any() and (last["index"] == -1).all()
  assert (last["image"] == 0).all()


def test_code_loader_order_resume_and_padding(tmp_path):
  extract = str(tmp_path / "extract")
  n = 23
  for shard, (lo, hi) in enumerate([(0, 10), (10, n)]):
    idx = np.arange(lo, hi)
    codes_lib.write_shard(extract, "train", shard, {
        "top": np.broadcast_to(idx[:, None, None], (hi - lo, 2, 2)).astype(np.uint16),
        "label": (idx % 3).astype(np.int32), "index": idx.astype(np.int64)})
  with open(os.path.join(extract, codes_lib.MANIFEST), "w") as f:
    json.dump({"levels": ["top"], "splits": {"train": {"num_shards": 2}},
               "num_classes": 3}, f)
  shards = codes_lib.CodeShards(extract, "train")
  loader = codes_lib.CodeLoader(shards, 6, seed=2, process_index=0, process_count=1)
  batches = _take(loader, 8)  # 3 steps per epoch
  for k, batch in enumerate(batches):
    want = loader.indices(*divmod(k, 3))
    np.testing.assert_array_equal(batch["top"][:, 0, 0], want)
    np.testing.assert_array_equal(batch["label"], want % 3)
    assert batch["top"].dtype == np.int32 and batch["top"].shape == (6, 2, 2)
  resumed = codes_lib.CodeLoader(shards, 6, seed=2, process_index=0, process_count=1)
  resumed.set_state({"epoch": 1, "step": 1})
  _equal(batches[4:], _take(resumed, 4))
  rows = np.array([22, 3, 7, 11, 0])
  seen = []
  for p in range(2):
    for batch in codes_lib.iterate_codes_once(shards, 4, indices=rows, process_index=p,
                                              process_count=2):
      assert batch["top"].shape == (2, 2, 2)
      seen.append((p, batch["top"][batch["valid"], 0, 0].tolist()))
  assert [v for _, v in sorted(seen, key=lambda s: s[0])] == [[22, 3], [0], [7, 11], []]
