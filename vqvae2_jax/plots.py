"""Pictures of a run: training curves, codebook usage, reconstructions from level subsets.

matplotlib is imported inside the functions that draw, so importing the module stays
light. Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing changes the
backend or the figures of an interactive session (a notebook's inline plots). Every
function writes a PNG and returns its path; figure sizes are fixed per panel (see the
constants) so callers and tests can rely on the layout.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from vqvae2_jax import images as image_lib
from vqvae2_jax import registry
from vqvae2_jax import storage

# Metrics drawn by `plot_training_curves`, in panel order.
CURVE_METRICS = ("loss", "mse", "psnr", "commitment", "perplexity", "code_usage",
                 "nll_bits", "accuracy", "top1")
LOG_SCALE_METRICS = ("loss", "mse")
CURVE_COLUMNS = 3  # panels per row of the curves figure
CURVE_PANEL_PX = (400, 300)  # (width, height) of one curves panel
HISTOGRAM_PANEL_PX = (500, 350)  # (width, height) of one level's histogram
DPI = 100


def _figure(width_px: int, height_px: int):
  """A matplotlib Figure on an Agg canvas (no pyplot, no display), width x height px."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str) -> str:
  return storage.save_figure(fig, path, dpi=DPI)


def _level_name(index: int, num_levels: int) -> str:
  return registry.level_names(num_levels)[index]


def read_metrics(stage_dir: str) -> list[dict[str, Any]]:
  """Rows of `<stage_dir>/metrics.jsonl` (blank lines skipped)."""
  path = storage.join(stage_dir, "metrics.jsonl")
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} does not exist: train the stage first (its "
                            "metrics.jsonl is written while it trains)")
  rows = []
  with storage.open(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{number} is not a JSON object: {e}") from e
  return rows


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(rows: Sequence[dict[str, Any]], metric: str, split: str
            ) -> dict[int | None, tuple[list[int], list[float]]]:
  """{level index (None for a scalar metric): (steps, values)} of one metric and split."""
  out: dict[int | None, tuple[list[int], list[float]]] = {}
  for row in rows:
    if row.get("split", registry.TRAIN) != split or metric not in row or "step" not in row:
      continue
    value = row[metric]
    values = value if isinstance(value, list) else [value]
    for i, v in enumerate(values):
      if _is_number(v) and math.isfinite(v):
        key = i if isinstance(value, list) else None
        steps, ys = out.setdefault(key, ([], []))
        steps.append(int(row["step"]))
        ys.append(float(v))
  return out


def curve_panels(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The metrics of CURVE_METRICS with at least one finite value in `rows`, in order."""
  return [m for m in CURVE_METRICS
          if any(_series(rows, m, split) for split in registry.SPLITS)]


def plot_training_curves(stage_dir: str, path: str | None = None) -> str:
  """Writes `<stage_dir>/curves.png`: one panel per metric logged in metrics.jsonl.

  Panels (those present, in this order): loss, mse, psnr, commitment, perplexity and
  code_usage (one line per level), nll_bits, accuracy, top1. Train lines are solid,
  validation lines dashed with markers; loss and mse use a log y axis. The figure is
  CURVE_COLUMNS panels wide, each panel CURVE_PANEL_PX pixels.

  Args:
    stage_dir: a stage's output folder holding metrics.jsonl (rows {'step', 'split':
      'train' | 'val', metric: scalar or per-level list}).
    path: where to write the PNG (default `<stage_dir>/curves.png`).

  Returns:
    The PNG's path.
  """
  rows = read_metrics(stage_dir)
  panels = curve_panels(rows)
  if not panels:
    raise ValueError(f"{stage_dir}/metrics.jsonl holds none of the metrics "
                     f"{', '.join(CURVE_METRICS)}")
  import matplotlib  # pylint: disable=g-import-not-at-top
  cols = min(CURVE_COLUMNS, len(panels))
  nrows = -(-len(panels) // cols)
  fig = _figure(cols * CURVE_PANEL_PX[0], nrows * CURVE_PANEL_PX[1])
  axes = fig.subplots(nrows, cols, squeeze=False)
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, metric in zip(axes.flat, panels):
    positive = True
    for split, style in ((registry.TRAIN, dict(linestyle="-", linewidth=1.2)),
                         (registry.VAL, dict(linestyle="--", marker="o", markersize=3))):
      series = _series(rows, metric, split)
      num_levels = max((k for k in series if k is not None), default=-1) + 1
      # Keys are all None (a scalar metric) or all level indices.
      for key, (steps, ys) in sorted(series.items(), key=lambda kv: kv[0] or 0):
        label = split if key is None else f"{split} {_level_name(key, num_levels)}"
        color = colors[(0 if key is None else key) % len(colors)]
        if split == registry.VAL and key is None:
          color = colors[1 % len(colors)]
        # A lone point draws no line: give it a marker so a one-row log still shows.
        marker = style.get("marker", "o" if len(steps) == 1 else None)
        ax.plot(steps, ys, label=label, color=color,
                **{**style, "marker": marker, "markersize": 3})
        positive = positive and min(ys) > 0
    if metric in LOG_SCALE_METRICS and positive:
      ax.set_yscale("log")
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.suptitle(storage.basename(stage_dir.rstrip("/")) if storage.is_remote(stage_dir)
               else os.path.basename(os.path.normpath(stage_dir)), fontsize=10)
  fig.tight_layout()
  return _save(fig, path or storage.join(stage_dir, "curves.png"))


def ema_counts(variables_or_counts: Any, level_names: Sequence[str]) -> list[np.ndarray]:
  """Per-level EMA code counts, float [K] each, top first.

  Accepts the VQ-VAE's variables (reads vq_stats/quantizers_<l>/ema_count), a mapping
  {level name: counts} or a sequence of count arrays.
  """
  if isinstance(variables_or_counts, Mapping) and "vq_stats" in variables_or_counts:
    stats = variables_or_counts["vq_stats"]
    missing = [f"quantizers_{l}" for l in range(len(level_names))
               if f"quantizers_{l}" not in stats]
    if missing:
      raise ValueError(f"vq_stats has no {missing}: the variables have {sorted(stats)} for "
                       f"the {len(level_names)} levels {tuple(level_names)}")
    counts = [stats[f"quantizers_{l}"]["ema_count"] for l in range(len(level_names))]
  elif isinstance(variables_or_counts, Mapping):
    missing = [n for n in level_names if n not in variables_or_counts]
    if missing:
      raise ValueError(f"no counts for levels {missing}; got keys "
                       f"{sorted(variables_or_counts)} (pass the VQ-VAE variables with "
                       "their 'vq_stats' collection, or {level: counts})")
    counts = [variables_or_counts[n] for n in level_names]
  else:
    counts = list(variables_or_counts)
  if len(counts) != len(level_names):
    raise ValueError(f"{len(counts)} count arrays for {len(level_names)} levels")
  out = [np.asarray(c, np.float64).reshape(-1) for c in counts]
  for name, c in zip(level_names, out):
    if not c.size or np.any(c < 0) or not np.all(np.isfinite(c)):
      raise ValueError(f"level {name}: EMA counts must be finite, >= 0 and non-empty")
  return out


def count_statistics(counts: np.ndarray, min_count: float = 0.01) -> tuple[float, float]:
  """(perplexity, fraction of codes used) of EMA counts float [K].

  Perplexity is exp(entropy) of the normalised counts. A code counts as used when its
  EMA count (about the vectors it receives per batch) is at least `min_count`; unused
  codes decay towards zero but never reach it.
  """
  total = counts.sum()
  probs = counts / total if total > 0 else np.full_like(counts, 1.0 / len(counts))
  entropy = -np.sum(probs * np.log(np.maximum(probs, 1e-30)))
  return float(np.exp(entropy)), float(np.mean(counts >= min_count))


def codebook_usage_histogram(variables_or_counts: Any, level_names: Sequence[str],
                             path: str, *, min_count: float = 0.01) -> str:
  """One bar plot per level of the EMA code counts, sorted in descending order.

  Each panel's title gives the level's perplexity (of the normalised counts) and the
  fraction of the K codes whose count is at least `min_count`. Panels sit side by side,
  HISTOGRAM_PANEL_PX pixels each.

  Args:
    variables_or_counts: the VQ-VAE's variables (with the 'vq_stats' collection), a
      mapping {level name: float [K]} or a sequence of float [K], top first.
    level_names: names of the levels, top first.
    path: the PNG to write.
    min_count: EMA count from which a code counts as used.

  Returns:
    path.
  """
  counts = ema_counts(variables_or_counts, level_names)
  fig = _figure(len(counts) * HISTOGRAM_PANEL_PX[0], HISTOGRAM_PANEL_PX[1])
  axes = fig.subplots(1, len(counts), squeeze=False)
  for ax, name, c in zip(axes.flat, level_names, counts):
    ordered = np.sort(c)[::-1]
    perplexity, used = count_statistics(c, min_count)
    # A log axis keeps the tail of rarely used codes visible; zeros are floored.
    ax.bar(np.arange(len(ordered)), np.maximum(ordered, 1e-6), width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.axhline(min_count, color="tab:red", linewidth=0.8, linestyle=":",
               label=f"used threshold {min_count:g}")
    ax.set_title(f"{name}: perplexity {perplexity:.1f} / {len(c)}, "
                 f"{100 * used:.0f}% codes used", fontsize=9)
    ax.set_xlabel("code rank")
    ax.set_ylabel("EMA count")
    ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def _subset_decode(model, variables, images):
  """uint8 [N, H, W, 3] -> float [L, N, H, W, 3]: decodes from levels 0..l for each l."""
  codes = model.apply(variables, image_lib.to_model(images), method=model.encode)
  n = model.num_levels
  outs = [model.apply(variables, codes, tuple(i <= l for i in range(n)),
                      method=model.decode_codes) for l in range(n)]
  return jnp.stack(outs)


@functools.cache
def _subset_decoder():
  # Modules are hashable, so one jitted function serves every model (one trace each).
  return jax.jit(_subset_decode, static_argnums=0)


def level_subset_images(model, variables, images_uint8: np.ndarray) -> np.ndarray:
  """Reconstructions from the top level only, top + next, ..., all levels.

  A collective computation when `variables` span several processes: call it on every
  process (and draw the figure on one, with `save_level_subset_figure`).

  Args:
    model: a VQVAE2 module.
    variables: its variables ({'params', 'vq_stats'}).
    images_uint8: uint8 [N, H, W, 3], the same on every process.

  Returns:
    uint8 [L, N, H, W, 3]; entry l decodes with levels 0..l (top first) and the levels
    below replaced by zeros (`VQVAE2.decode_codes` with a level mask).
  """
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3 or images_uint8.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N, H, W, 3]; got {images_uint8.dtype} "
                     f"{images_uint8.shape}")
  pixels = _subset_decoder()(model, variables, images_uint8)
  if not pixels.is_fully_addressable:
    pixels = multihost_utils.process_allgather(pixels, tiled=True)
  return image_lib.to_uint8(jax.device_get(pixels))


def subset_labels(level_names: Sequence[str]) -> list[str]:
  """Column titles of the level-subset figure: 'top', '+mid', '+bottom', 'original'."""
  return [level_names[0]] + [f"+{n}" for n in level_names[1:]] + ["original"]


def level_subset_reconstructions(model, variables, images_uint8: np.ndarray,
                                 level_names: Sequence[str], path: str, *,
                                 scale: int = 1, pad: int = 2,
                                 header: int = 14) -> str:
  """The paper's Figure 3: reconstructions from growing subsets of levels.

  Rows are images; columns are the reconstruction from the top level only, then top and
  the next level, ..., all levels, and the original on the right, titled by
  `subset_labels(level_names)`. The PNG is exactly
  (L + 1) * (scale * W + pad) + pad pixels wide and
  header + N * (scale * H + pad) + pad pixels high.

  Args:
    model: a VQVAE2 module with len(level_names) levels.
    variables: its variables.
    images_uint8: uint8 [N, H, W, 3].
    level_names: names of the levels, top first.
    path: the PNG to write.
    scale: integer nearest-neighbour magnification of every tile (small images).
    pad: pixels between tiles. header: height of the column-title band.

  Returns:
    path.
  """
  if len(level_names) != model.num_levels:
    raise ValueError(f"{len(level_names)} level names for a {model.num_levels}-level model")
  images_uint8 = np.asarray(images_uint8)
  subsets = level_subset_images(model, variables, images_uint8)
  return save_level_subset_figure(subsets, images_uint8, level_names, path, scale=scale,
                                  pad=pad, header=header)


def save_level_subset_figure(subsets: np.ndarray, originals: np.ndarray,
                             level_names: Sequence[str], path: str, *, scale: int = 1,
                             pad: int = 2, header: int = 14) -> str:
  """Draws `level_subset_images` output uint8 [L, N, H, W, 3] beside the originals
  uint8 [N, H, W, 3] (layout as in `level_subset_reconstructions`); returns path."""
  subsets, originals = np.asarray(subsets), np.asarray(originals)
  if subsets.shape[0] != len(level_names) or subsets.shape[1:] != originals.shape:
    raise ValueError(f"subsets {subsets.shape} must be [L={len(level_names)}, N, H, W, 3] "
                     f"for originals {originals.shape}")
  if scale < 1:
    raise ValueError(f"scale={scale} must be a positive integer")
  columns = list(subsets) + [originals]
  n, h, w, _ = originals.shape
  th, tw = h * scale, w * scale
  canvas = Image.new("RGB", (len(columns) * (tw + pad) + pad, header + n * (th + pad) + pad),
                     (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for c, (title, column) in enumerate(zip(subset_labels(level_names), columns)):
    x0 = pad + c * (tw + pad)
    draw.text((x0 + 1, 1), title[:max(1, tw // 6)], fill=(0, 0, 0))
    for r in range(n):
      tile = Image.fromarray(column[r])
      if scale > 1:
        tile = tile.resize((tw, th), Image.NEAREST)
      canvas.paste(tile, (x0, header + pad + r * (th + pad)))
  return storage.save_picture(canvas, path)
