"""Pictures of a run: training curves, codebook usage, Figure-3 level subsets."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from helpers import load_config
from vqvae2_jax import plots

# Tests sharing the session-wide tiny pipeline run in one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_pipeline")


def _write_metrics(directory, rows):
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / "metrics.jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(directory)


def _expected_size(num_panels):
  cols = min(plots.CURVE_COLUMNS, num_panels)
  rows = math.ceil(num_panels / cols)
  return cols * plots.CURVE_PANEL_PX[0], rows * plots.CURVE_PANEL_PX[1]


def test_curves_one_panel_per_metric_present(tmp_path):
  rows = []
  for step in (10, 20, 30):
    rows.append({"step": step, "split": "train", "loss": 1.0 / step, "mse": 0.5 / step,
                 "perplexity": [3.0 + step, 5.0], "code_usage": [0.5, 0.25],
                 "grad_norm": 1.0, "step_time": 0.1})
  rows.append({"step": 30, "split": "val", "mse": 0.02, "psnr": 20.0, "num_images": 8})
  stage = _write_metrics(tmp_path / "vqvae", rows)
  assert plots.curve_panels(plots.read_metrics(stage)) == [
      "loss", "mse", "psnr", "perplexity", "code_usage"]
  path = plots.plot_training_curves(stage)
  assert path == str(tmp_path / "vqvae" / "curves.png")
  assert Image.open(path).size == _expected_size(5) == (1200, 600)


def test_curves_single_row_and_skipped_values(tmp_path):
  # One row, a metric that is only NaN (no panel), an unknown metric (no panel).
  stage = _write_metrics(tmp_path / "prior_top", [
      {"step": 1, "split": "train", "nll_bits": 3.5, "accuracy": float("nan"),
       "latents_per_sec": 100.0}])
  assert plots.curve_panels(plots.read_metrics(stage)) == ["nll_bits"]
  assert Image.open(plots.plot_training_curves(stage)).size == _expected_size(1)
  # Val-only metrics still get their panel; a non-positive loss keeps a linear axis.
  stage = _write_metrics(tmp_path / "classifier", [
      {"step": 2, "split": "train", "loss": 0.0, "accuracy": 0.5},
      {"step": 2, "split": "val", "top1": 0.25, "top5": 1.0}])
  assert plots.curve_panels(plots.read_metrics(stage)) == ["loss", "accuracy", "top1"]
  assert Image.open(plots.plot_training_curves(stage)).size == _expected_size(3)


def test_curves_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    plots.plot_training_curves(str(tmp_path / "missing"))
  stage = _write_metrics(tmp_path / "other", [{"step": 1, "split": "train", "foo": 1.0}])
  with pytest.raises(ValueError, match="none of the metrics"):
    plots.plot_training_curves(stage)


def test_count_statistics():
  k = 8
  perplexity, used = plots.count_statistics(np.full(k, 3.0))
  assert perplexity == pytest.approx(k) and used == 1.0
  one_hot = np.zeros(k)
  one_hot[2] = 5.0
  perplexity, used = plots.count_statistics(one_hot)
  assert perplexity == pytest.approx(1.0) and used == pytest.approx(1 / k)
  # Two codes used equally: exp(log 2) = 2; below-threshold counts are unused.
  perplexity, used = plots.count_statistics(np.array([4.0, 4.0, 1e-4, 0.0]), min_count=0.01)
  assert perplexity == pytest.approx(2.0, rel=1e-3) and used == 0.5


@pytest.fixture(scope="module")
def trained_vqvae(tiny_pipeline):
  from vqvae2_jax.models.vqvae import level_names  # pylint: disable=g-import-not-at-top
  import vqvae2_jax  # pylint: disable=g-import-not-at-top
  run = vqvae2_jax.load(tiny_pipeline)
  model, variables = run.vqvae
  config = run.config
  return config, model, variables, level_names(config.vqvae.num_levels)


def test_codebook_histogram_from_checkpoint(trained_vqvae, tmp_path):
  _, _, variables, names = trained_vqvae
  path = plots.codebook_usage_histogram(variables, names, str(tmp_path / "usage.png"))
  assert Image.open(path).size == (len(names) * plots.HISTOGRAM_PANEL_PX[0],
                                    plots.HISTOGRAM_PANEL_PX[1])
  counts = plots.ema_counts(variables, names)
  for l, c in enumerate(counts):
    np.testing.assert_array_equal(
        c, np.asarray(variables["vq_stats"][f"quantizers_{l}"]["ema_count"]))
  # The same counts given per level name or as a list read the same.
  by_name = plots.ema_counts(dict(zip(names, counts)), names)
  for a, b in zip(by_name, counts):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="no counts for levels"):
    plots.ema_counts({"top": counts[0]}, names)


def test_level_subset_figure_layout_and_columns(trained_vqvae, tmp_path):
  from vqvae2_jax import images as image_lib  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.data.sources import make_source  # pylint: disable=g-import-not-at-top
  config, model, variables, names = trained_vqvae
  source = make_source(config.data, "val")
  originals = np.stack([source.get(i)[0] for i in range(3)])
  n, h, w, _ = originals.shape
  pad, header, scale = 2, 14, 2
  path = plots.level_subset_reconstructions(model, variables, originals, names,
                                            str(tmp_path / "subsets.png"), scale=scale)
  picture = np.asarray(Image.open(path).convert("RGB"))
  columns = len(names) + 1
  assert picture.shape[:2] == (header + n * (scale * h + pad) + pad,
                               columns * (scale * w + pad) + pad)
  assert plots.subset_labels(names) == ["top", "+bottom", "original"]

  def tile(row, col):
    y0, x0 = header + pad + row * (scale * h + pad), pad + col * (scale * w + pad)
    return picture[y0:y0 + scale * h:scale, x0:x0 + scale * w:scale]

  subsets = plots.level_subset_images(model, variables, originals)
  assert subsets.shape == (len(names), n, h, w, 3) and subsets.dtype == np.uint8
  # All levels decoded from the codes = the model's own encode-decode reconstruction.
  full = image_lib.to_uint8(model.apply(variables, image_lib.to_model(originals),
                                        method=model.reconstruct))
  assert np.max(np.abs(subsets[-1].astype(int) - full.astype(int))) <= 1
  # Dropping the bottom level changes the picture.
  assert np.any(subsets[0] != subsets[-1])
  for r in range(n):
    np.testing.assert_array_equal(tile(r, columns - 1), originals[r])
    for c in range(len(names)):
      np.testing.assert_array_equal(tile(r, c), subsets[c, r])


def test_level_subset_rejects_bad_input(trained_vqvae, tmp_path):
  _, model, variables, names = trained_vqvae
  with pytest.raises(ValueError, match="uint8"):
    plots.level_subset_images(model, variables, np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="level names"):
    plots.level_subset_reconstructions(model, variables, np.zeros((1, 32, 32, 3), np.uint8),
                                       names[:1], str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="must be"):
    plots.save_level_subset_figure(np.zeros((1, 2, 8, 8, 3), np.uint8),
                                   np.zeros((2, 8, 8, 3), np.uint8), names,
                                   str(tmp_path / "y.png"))
