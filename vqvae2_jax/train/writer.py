"""Metrics output: <stage>/metrics.jsonl, TensorBoard event files, progress lines.

Only process 0 writes. TensorBoard files come from tensorboardX (no TensorFlow needed).
The stage folder may be on a bucket (`vqvae2_jax.storage`): there a bucket object cannot be
appended to, so each write rewrites metrics.jsonl and each flush the event file (a run
logs every `log_every` steps, so the cost is a few uploads per logged step).
"""
from __future__ import annotations

import io
import json
import math
import time
from typing import Any

import jax
import numpy as np

from vqvae2_jax import registry
from vqvae2_jax import storage


def _plain(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Appends one JSON object per logged step: {'step': int, 'split': ..., name: value}."""

  def __init__(self, stage_dir: str, *, total_steps: int, name: str,
               tensorboard: bool = True):
    self.path = storage.join(stage_dir, "metrics.jsonl")
    self.total_steps, self.name = total_steps, name
    self.active = jax.process_index() == 0
    self._tb = None
    self._start = time.time()
    if self.active:
      storage.makedirs(stage_dir)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
          logdir = storage.join(stage_dir, "tensorboard")
          if storage.is_remote(logdir):
            _register_bucket_event_files(logdir)
          self._tb = SummaryWriter(logdir)
        except ImportError:
          self._tb = None

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after `step` (a resumed run re-logs them)."""
    if not self.active or not storage.exists(self.path):
      return
    rows = [line + "\n" for line in storage.read_text(self.path).splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    storage.write_text(self.path, "".join(rows))

  def write(self, step: int, metrics: dict[str, Any], split: str = registry.TRAIN) -> dict:
    """Writes and returns the row; scalars and per-level lists are both accepted."""
    row = {"step": int(step), "split": split}
    row.update({k: _plain(v) for k, v in metrics.items()})
    if not self.active:
      return row
    storage.append_text(self.path, json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k in ("step", "split"):
          continue
        values = v if isinstance(v, list) else [v]
        for i, x in enumerate(values):
          if isinstance(x, (int, float)) and math.isfinite(x):
            tag = f"{split}/{k}" if len(values) == 1 else f"{split}/{k}/{i}"
            self._tb.add_scalar(tag, x, step)
      self._tb.flush()
    return row

  def progress(self, step: int, row: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Prints a one-line progress report with an ETA."""
    if not self.active:
      return
    elapsed = time.time() - self._start
    parts = []
    for k in keys:
      if k in row:
        v = row[k]
        parts.append(f"{k}=" + (",".join(f"{x:.4g}" for x in v) if isinstance(v, list)
                                else f"{v:.4g}"))
    done = step / max(self.total_steps, 1)
    print(f"[{self.name}] step {step}/{self.total_steps} ({100 * done:.0f}%) "
          + " ".join(parts) + f" | {elapsed:.0f}s elapsed", flush=True)

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer."""
    if self._tb is not None:
      self._tb.close()


class _BucketEventFile:
  """One TensorBoard event file on a bucket: records are kept in memory and the whole
  object is written on every flush (a bucket object cannot be appended to)."""

  def __init__(self, path: str):
    self.path, self._buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    storage.write_bytes(self.path, self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _BucketEventFiles:
  """tensorboardX's writer-factory interface over `vqvae2_jax.storage`."""

  def open(self, path: str) -> _BucketEventFile:
    return _BucketEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # a bucket has no folders to create


def _register_bucket_event_files(logdir: str) -> None:
  """Sends tensorboardX's event files for `logdir`'s scheme (gs, ...) through `storage`.

  tensorboardX's own gs:// writer uses another client (google-cloud-storage, with its
  own credentials and endpoint lookup) and uploads again from a destructor at exit; this
  one uses the same client, settings and endpoint as every other file of the run.
  """
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory(logdir.split("://", 1)[0], _BucketEventFiles())
