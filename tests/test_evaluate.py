"""The evaluate stage: the report of the tiny demo pipeline, its pieces, and clear errors."""
import json
import math
import os
import shutil

import numpy as np
import pytest

from vqvae2_jax import api
from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import main
from vqvae2_jax import parallel
from vqvae2_jax.data.sources import make_source
from vqvae2_jax.eval import classifier_training
from vqvae2_jax.eval import distances
from vqvae2_jax.eval import metrics
from vqvae2_jax.eval import report as report_lib
from vqvae2_jax.eval import tradeoff
from vqvae2_jax.sampling import rejection
from vqvae2_jax.sampling.hierarchical import SampleOptions

from helpers import load_config

# Tests sharing the session-wide tiny pipeline run in one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_pipeline")


@pytest.fixture(scope="session")  # session: xdist may interleave modules of the group
def evaluated(tiny_pipeline):
  """The tiny pipeline's workdir after one `evaluate` run."""
  main.run_stage(load_config("demo", "evaluate,tiny"), tiny_pipeline)
  return tiny_pipeline


def _finite(*values):
  return all(v is not None and math.isfinite(v) for v in values)


def test_report_has_table1_with_finite_values(evaluated):
  out = os.path.join(evaluated, "evaluate")
  report = json.load(open(os.path.join(out, "report.json")))
  t1 = report["table1"]
  num_codes = load_config("demo", "evaluate,tiny").vqvae.num_codes
  for level in ("top", "bottom"):
    assert t1["priors"][level]["params"] == "raw"  # the demo keeps no parameter EMA
    for split, count in (("train", 64), ("val", 8)):
      row = t1["priors"][level][split]
      assert _finite(row["nll_nats"], row["nll_bits"]) and row["num_examples"] == count
      assert row["nll_bits"] == pytest.approx(row["nll_nats"] / math.log(2))
      # Four training steps leave the prior near uniform over the 16 codes.
      assert 0.5 * math.log(num_codes) < row["nll_nats"] < 2 * math.log(num_codes)
  for split, count in (("train", 64), ("val", 8)):
    row = t1["vqvae"][split]
    assert _finite(row["mse"]) and row["num_images"] == count
    assert row["mse_01"] == pytest.approx(row["mse"] / 4)
  md = open(os.path.join(out, "report.md")).read()
  assert "Table 1" in md and "[0, 1]" in md and "Top prior" in md and "VQ decoder" in md


def test_report_sample_metrics_tradeoff_and_cas(evaluated):
  out = os.path.join(evaluated, "evaluate")
  report = json.load(open(os.path.join(out, "report.json")))
  md = open(os.path.join(out, "report.md")).read()
  net = report["networks"]["fid"]
  if net is None:  # no torch and no converted weights: the sections are skipped, said so
    assert any("skipped" in n for n in report["notes"]) and "Notes" in md
  else:
    assert net["name"] == "efficientnet_lite0" and "NOT comparable" in net["label"]
    assert "NOT comparable" in md
    s = report["samples"]
    assert s["num_images"] == 8 and _finite(s["fid"], s["fid_star"], s["is_mean"])
    assert 1.0 <= s["is_mean"] <= 1000 and 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1
    assert _finite(report["reconstructions"]["fid"])
    assert [r["keep_fraction"] for r in report["tradeoff"]] == [1.0, 0.5]
    assert all(r["num_images"] == 8 for r in report["tradeoff"])
    assert os.path.exists(os.path.join(out, "tradeoff.png")) and "tradeoff.png" in md
    mu, sigma = metrics.load_stats(os.path.join(out, "ref_stats_efficientnet_lite0.npz"))
    assert mu.shape == (1280,) and sigma.shape == (1280, 1280)
    # The experiment's own classifier selects: EfficientNet judging is not self-judging.
    assert report["self_judged"] is False and "WARNING" not in md
  # CAS: the real-data classifier's figure equals accuracy_on over the validation split.
  cas = report["cas"]
  # (the demo trains one more CAS classifier per keep fraction below 1: cas_per_point)
  assert set(cas) == {"real_trained_on_real", "real_trained_on_recon",
                      "sample_trained_on_real", "sample_trained_on_recon",
                      "sample_keep0.5_trained_on_real", "sample_keep0.5_trained_on_recon"}
  assert [r["cas_top1"] for r in report["tradeoff"]] == [
      cas["sample_trained_on_real"]["top1"], cas["sample_keep0.5_trained_on_real"]["top1"]]
  config = load_config("demo", "classifier,tiny")
  val = make_source(config.data, "val")
  model, params = api.load(evaluated, config=config).classifier
  with parallel.use_mesh(parallel.make_mesh(config.mesh), config.axis_rules):
    ref = classifier_training.accuracy_on(classifier_training.make_logits_fn(model), params,
                                          val, 8)
  assert cas["real_trained_on_real"]["top1"] == pytest.approx(ref["top1"])
  assert cas["real_trained_on_real"]["top5"] == pytest.approx(ref["top5"])
  assert "Classification Accuracy Score" in md


def test_missing_inception_weights_file_is_a_clear_error(evaluated):
  config = load_config("demo", "evaluate,tiny",
                       **{"evaluate.inception_weights": "/nonexistent/pt_inception.pth"})
  with pytest.raises(FileNotFoundError, match="evaluate.inception_weights.*does not exist"):
    main.run_stage(config, evaluated)


def test_too_few_images_for_a_covariance_is_a_clear_error(evaluated):
  with pytest.raises(ValueError, match="covariance needs at least 2 images"):
    main.run_stage(load_config("demo", "evaluate,tiny", **{"evaluate.num_images": 1}),
                   evaluated)
  one = distances.SetStats(1, 0, seed=0)
  one.update({"fid": np.ones((1, 4))})
  with pytest.raises(ValueError, match="covariance needs at least 2 images"):  # eval.metrics
    distances.fid_between(one, (np.zeros(4), np.eye(4)), "one image")


def test_evaluate_without_stage1_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match="no stage-1 .*vqvae.* checkpoint"):
    main.run_stage(load_config("demo", "evaluate,tiny"), str(tmp_path))
  assert not os.path.exists(tmp_path / "evaluate" / "report.json")


@pytest.mark.parametrize("n1,dim", [(300, 16), (6, 16)])
def test_fast_frechet_distance_matches_pytorch_fid_formula(n1, dim):
  rng = np.random.default_rng(n1)
  a = rng.normal(size=(n1, dim))
  b = rng.normal(size=(200, dim)) * 1.3 + 0.2
  s = distances.SetStats(n1, 0, seed=0)
  for block in np.array_split(a, 3):
    s.update({"fid": block})
  mu1, s1 = s.moments.stats()
  mu2, s2 = metrics.stats_from_features(b)
  ref = metrics.frechet_distance(mu1, s1, mu2, s2)
  fast = metrics.frechet_distance(mu1, s1, mu2, s2, method="eigh")
  assert fast == pytest.approx(ref, rel=1e-6)
  factor = s.covariance_factor()
  assert (factor is None) == (n1 > dim)
  if factor is not None:
    np.testing.assert_allclose(factor.T @ factor, s1, atol=1e-12)
    assert metrics.frechet_distance(mu1, s1, mu2, s2, method="eigh",
                                    factor1=factor) == pytest.approx(ref, rel=1e-6)
    assert distances.fid_between(s, (mu2, s2), "set") == (pytest.approx(ref, rel=1e-6), [])


def test_precision_recall_subsample_is_fixed_and_independent_of_blocks():
  feats = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
  kept = []
  for splits in (1, 7):
    s = distances.SetStats(50, 12, seed=3)
    for block in np.array_split(feats, splits):
      s.update({"pr": block})
    kept.append(s.pr_features())
  assert kept[0].shape == (12, 3)
  np.testing.assert_array_equal(kept[0], kept[1])
  assert len(np.unique(kept[0][:, 0])) == 12


def test_acceptance_masks_keep_num_images_and_the_class_mix():
  rng = np.random.default_rng(0)
  num, classes = 30, 3
  labels = np.resize(np.arange(classes), 120)
  scores = rng.random(120)
  masks = rejection.acceptance_masks(scores, labels, num, [1.0, 0.5, 0.25])
  np.testing.assert_array_equal(np.nonzero(masks[1.0])[0], np.arange(num))
  for f, m in masks.items():
    prefix = math.ceil(num / f)
    assert m.sum() == num and not m[prefix:].any()
    np.testing.assert_array_equal(np.bincount(labels[m], minlength=classes),
                                  np.bincount(labels[:num], minlength=classes))
    for c in range(classes):  # the accepted ones are the best of their class
      members = np.nonzero(labels[:prefix] == c)[0]
      best = members[np.argsort(-scores[members])[:m[labels == c].sum()]]
      assert set(best) == set(np.nonzero(m & (labels == c))[0])
  # Stricter rejection keeps higher-scoring samples.
  assert scores[masks[0.25]].mean() > scores[masks[0.5]].mean() > scores[masks[1.0]].mean()


def test_markdown_without_inputs_notes_what_was_skipped(tmp_path):
  report = {"experiment": "x", "table1": {"priors": {}, "vqvae": {
      "train": {"mse": 0.04, "mse_01": 0.01, "psnr": 20.0, "num_images": 4}}},
            "notes": ["prior NLL skipped: no code shards"], "vqvae_step": 3,
            "networks": {"fid": None, "precision_recall": None}}
  written = report_lib.write(report, str(tmp_path))
  md = (tmp_path / "report.md").read_text()
  assert "0.0400 [0.0100]" in md and "prior NLL skipped" in md
  assert written["tradeoff_plot"] is None and not (tmp_path / "tradeoff.png").exists()
  assert json.load(open(tmp_path / "report.json"))["table1"]["vqvae"]["train"]["mse"] == 0.04


def test_self_judged_names_the_metrics_the_selector_computes():
  eff = "efficientnet_lite0"
  assert tradeoff.self_judged(eff, eff, eff) == ["FID / IS / FID*", "precision / recall"]
  assert tradeoff.self_judged(eff, "inception", eff) == ["precision / recall"]
  assert tradeoff.self_judged(eff, "inception", "vgg16") == []
  assert tradeoff.self_judged(None, eff, eff) == []  # the experiment's own classifier


def test_self_judged_tradeoff_is_marked_at_the_top_of_its_section(tmp_path):
  rows = [{"keep_fraction": f, "candidates": 8, "num_images": 4, "fid": 3.0 - f,
           "is_mean": 1.0 + f} for f in (1.0, 0.5)]
  warning = tradeoff.self_judged_warning("efficientnet_lite0 (ImageNet)", ["FID / IS / FID*"])
  for judged in (True, False):
    report = {"tradeoff": rows, "self_judged": judged,
              "networks": {"fid": {"name": "efficientnet_lite0",
                                   "comparable_with_published": False}}}
    if judged:
      report["self_judged_warning"] = warning
    out = tmp_path / str(judged)
    report_lib.write(report, str(out))
    lines = (out / "report.md").read_text().splitlines()
    top = lines[lines.index("## Classifier-based rejection sampling (paper Figure 7)") + 2]
    assert top.startswith("> **WARNING** SELF-JUDGED") == judged
    assert json.load(open(out / "report.json"))["self_judged"] is judged
  assert "efficientnet_lite0 (ImageNet)" in warning and "inception_weights" in warning


def test_evaluate_flags_efficientnet_selecting_and_judging(evaluated, tmp_path):
  """Issue 11 item 6: EfficientNet-Lite0 both rejecting and computing FID is flagged."""
  report = json.load(open(os.path.join(evaluated, "evaluate", "report.json")))
  if report["networks"]["fid"] is None:
    pytest.skip("no EfficientNet-Lite0 weights: nothing can judge the samples")
  workdir = str(tmp_path / "w")
  shutil.copytree(evaluated, workdir)  # candidates, caches and CAS classifiers resume
  main.run_stage(load_config("demo", "evaluate,tiny",
                             **{"evaluate.rejection_classifier": "efficientnet_lite0"}),
                 workdir)
  out = os.path.join(workdir, "evaluate")
  report = json.load(open(os.path.join(out, "report.json")))
  assert report["self_judged"] is True
  assert report["rejection_classifier"].startswith("efficientnet_lite0")
  assert any(n.startswith("SELF-JUDGED") for n in report["notes"])
  lines = open(os.path.join(out, "report.md")).read().splitlines()
  top = lines[lines.index("## Classifier-based rejection sampling (paper Figure 7)") + 2]
  assert top.startswith("> **WARNING** SELF-JUDGED") and "precision / recall" in top


class _FakeSampler:
  """Images that depend only on (seed, row): a resumed run must equal a fresh one."""

  def __init__(self, fail_after: int | None = None):
    self.options = SampleOptions(batch_size=2)
    self.num_classes, self.calls, self.fail_after = 3, 0, fail_after

  def generate(self, n, labels, seed, progress=False):
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise KeyboardInterrupt("killed")
    self.calls += 1
    rows = np.arange(n) + seed + 10 * np.asarray(labels)
    image = (rows % 251)[:, None, None, None]
    return {"image": np.broadcast_to(image, (n, 4, 4, 3)).astype(np.uint8)}


def test_candidates_resume_to_the_uninterrupted_result_and_restart_on_a_new_key(tmp_path):
  kwargs = dict(seed=5, image_size=4, model_steps={"vqvae_step": 1}, log=lambda m: None)
  whole = tradeoff.generate_candidates(_FakeSampler(), 300, str(tmp_path / "a"), **kwargs)
  with pytest.raises(KeyboardInterrupt):  # killed after the warm-up and the first chunk
    tradeoff.generate_candidates(_FakeSampler(fail_after=2), 300, str(tmp_path / "b"), **kwargs)
  restarted = []
  resumed_sampler = _FakeSampler()
  resumed = tradeoff.generate_candidates(resumed_sampler, 300, str(tmp_path / "b"),
                                         on_restart=lambda: restarted.append(1), **kwargs)
  # The warm-up batch (compilation outside the clock), then only the missing chunks.
  assert resumed_sampler.calls == 3 and not restarted
  np.testing.assert_array_equal(resumed.images, whole.images)
  np.testing.assert_array_equal(resumed.labels, np.resize(np.arange(3), 300))
  tradeoff.generate_candidates(_FakeSampler(), 300, str(tmp_path / "b"),
                               on_restart=lambda: restarted.append(1),
                               **dict(kwargs, model_steps={"vqvae_step": 2}))
  assert restarted == [1]  # a new stage-1 checkpoint: start over
