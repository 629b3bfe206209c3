"""Metrics output: <stage>/metrics.jsonl, TensorBoard event files, progress lines.

Only process 0 writes. TensorBoard files come from tensorboardX (no TensorFlow needed).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np


def _plain(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Appends one JSON object per logged step: {'step': int, 'split': ..., name: value}."""

  def __init__(self, stage_dir: str, *, total_steps: int, name: str,
               tensorboard: bool = True):
    self.path = os.path.join(stage_dir, "metrics.jsonl")
    self.total_steps, self.name = total_steps, name
    self.active = jax.process_index() == 0
    self._tb = None
    self._start = time.time()
    if self.active:
      os.makedirs(stage_dir, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
          self._tb = SummaryWriter(os.path.join(stage_dir, "tensorboard"))
        except ImportError:
          self._tb = None

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after `step` (a resumed run re-logs them)."""
    if not self.active or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(rows)

  def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> dict:
    """Writes and returns the row; scalars and per-level lists are both accepted."""
    row = {"step": int(step), "split": split}
    row.update({k: _plain(v) for k, v in metrics.items()})
    if not self.active:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
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
