"""The trade-off's cost columns (counted and timed) and its per-point CAS bookkeeping."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vqvae2_jax.eval import report as report_lib
from vqvae2_jax.eval import tradeoff
from vqvae2_jax.sampling.hierarchical import SampleOptions


def test_sampling_seconds_charges_scoring_only_when_rejecting():
  # keep 0.25: 400 candidates for 100 images, each 0.1 s to draw and 0.02 s to score.
  assert tradeoff.sampling_seconds(400, 100, 0.25, 0.1, 0.02) == pytest.approx(0.48)
  # keep 1 draws what it keeps and scores nothing.
  assert tradeoff.sampling_seconds(100, 100, 1.0, 0.1, 0.02) == pytest.approx(0.1)
  assert tradeoff.sampling_seconds(100, 100, 1.0, None, 0.02) is None  # untimed


def test_cas_names_are_distinct_per_point():
  names = {tradeoff.cas_name(1.0, 1.0, 1.0), tradeoff.cas_name(0.5, 1.0, 1.0),
           tradeoff.cas_name(0.25, 1.0, 1.0), tradeoff.cas_name(1.0, 2.0, 1.0),
           tradeoff.cas_name(1.0, 3.0, 1.0)}
  assert len(names) == 5 and tradeoff.cas_name(1.0, 1.0, 1.0) == "sample_trained"
  # A sampler drawn at w = 2 calls its own unrejected samples 'sample_trained'.
  assert tradeoff.cas_name(1.0, 2.0, 2.0) == "sample_trained"


def test_attach_cas_fills_the_rows_that_have_a_classifier():
  rows = [dict(keep_fraction=1.0, guidance=1.0), dict(keep_fraction=0.5, guidance=1.0),
          dict(keep_fraction=1.0, guidance=2.0)]
  cas = {"sample_trained_on_real": {"top1": 0.3, "top5": 0.8},
         "sample_w2_trained_on_real": {"top1": 0.4, "top5": 0.9},
         "sample_w2_trained_on_recon": {"top1": 0.0, "top5": 0.0}}
  tradeoff.attach_cas(rows, cas, base_guidance=1.0)
  assert [r.get("cas_top1") for r in rows] == [0.3, None, 0.4]
  assert rows[2]["cas_top5"] == 0.9


class _CountingSampler:
  """Records every generate call; images encode the seed so chunks can be told apart."""
  num_classes = 2

  def __init__(self, batch_size):
    self.options = SampleOptions(batch_size=batch_size)
    self.calls = []

  def generate(self, n, labels, seed, progress=False):
    del labels, progress
    self.calls.append((n, seed))
    return {"image": np.full((n, 2, 2, 3), seed % 251, np.uint8)}


def test_generation_is_timed_without_the_warm_up_and_survives_a_resume(tmp_path):
  directory = str(tmp_path / "cands")
  kw = dict(seed=3, image_size=2, model_steps={}, log=lambda m: None)
  first = _CountingSampler(batch_size=128)
  cands = tradeoff.generate_candidates(first, 300, directory, **kw)
  # One warm-up batch at a seed no chunk uses, then chunks of 128.
  assert first.calls[0] == (128, 3 * 1_000_003 - 1)
  assert [n for n, _ in first.calls[1:]] == [128, 128, 44]
  progress = json.load(open(os.path.join(directory, tradeoff.PROGRESS)))
  assert progress["timed"] == 300 and progress["seconds"] > 0
  assert cands.seconds_per_image == pytest.approx(progress["seconds"] / 300)
  # Pretend the run stopped after the first chunk: the rerun draws the rest only and
  # keeps the seconds the first run measured.
  progress.update(done=128, timed=128, seconds=1000.0)
  json.dump(progress, open(os.path.join(directory, tradeoff.PROGRESS), "w"))
  second = _CountingSampler(batch_size=128)
  cands = tradeoff.generate_candidates(second, 300, directory, **kw)
  assert [n for n, _ in second.calls[1:]] == [128, 44]
  assert cands.seconds_per_image > 1000.0 / 300
  # Finished candidates are read back, nothing is drawn (not even the warm-up).
  third = _CountingSampler(batch_size=128)
  tradeoff.generate_candidates(third, 300, directory, **kw)
  assert third.calls == []


def test_report_shows_seconds_and_cas_columns_and_the_cost_panel(tmp_path):
  row = lambda f, w, secs, cas: dict(
      keep_fraction=f, guidance=w, candidates=8, num_images=8, sampling_cost=1 / f,
      seconds_per_image=secs, fid=10.0, is_mean=2.0, precision=0.5, recall=0.4,
      mean_class_score=0.3, cas_top1=cas, cas_top5=0.9)
  report = {"tradeoff": [row(1.0, 1.0, 0.05, 0.31), row(0.5, 1.0, 0.11, 0.28)],
            "guidance": [row(1.0, 2.0, 0.09, 0.35)]}
  written = report_lib.write(report, str(tmp_path))
  md = (tmp_path / "report.md").read_text()
  assert "s / image" in md and "CAS top-1 %" in md
  assert "| 0.0500 |" in md and "| 31.00 |" in md and "| 35.00 |" in md
  assert written["tradeoff_plot"] == "tradeoff.png"
  # Rows without CAS leave the column out.
  for r in report["tradeoff"] + report["guidance"]:
    r.pop("cas_top1")
  assert "CAS top-1" not in report_lib.render_markdown(report)


def test_guidance_grid_groups_each_draw_across_scales():
  labels = np.array([0, 1, 2, 0, 1, 2, 0], np.int32)
  by_scale = {w: tradeoff.Candidates(
      np.stack([np.full((2, 2, 3), 10 * w + i, np.uint8) for i in range(len(labels))]),
      labels) for w in (1.0, 2.0, 3.0)}
  tiles, cols, names, captions = tradeoff.guidance_grid(by_scale, ["a", "b"], per_class=2)
  assert cols == 6 and names == ["a", "b", "2"]  # class 2 has no name: its index
  # Row of class 0: its candidates 0 and 3, each at w 1, 2, 3.
  np.testing.assert_array_equal(tiles[:6, 0, 0, 0], [10, 20, 30, 13, 23, 33])
  assert captions[:3] == ["w 1", "w 2", "w 3"] and len(tiles) == 18
