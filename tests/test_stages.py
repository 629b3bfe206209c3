"""The command line and the stages wired end to end on the tiny demo."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import images as image_lib
from vqvae2_jax import main
from vqvae2_jax import parallel
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data.loader import iterate_once
from vqvae2_jax.data.sources import make_source
import vqvae2_jax
from vqvae2_jax.workdir import ConfigConflictError, StageMissingError

from helpers import ROOT, load_config

# Tests sharing the session-wide tiny pipeline run in one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_pipeline")


def run_cli(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vqvae2_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_runs_demo_vqvae_tiny(tmp_path):
  result = run_cli("--config=configs/demo.py:vqvae,tiny", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  stage = tmp_path / "vqvae"
  rows = [json.loads(l) for l in open(stage / "metrics.jsonl")]
  train = [r for r in rows if r["split"] == "train"]
  assert train[-1]["step"] == 4 and np.isfinite(train[-1]["loss"])
  assert {"mse", "psnr", "commitment", "perplexity", "code_usage", "images_per_sec",
          "step_time"} <= set(train[-1])
  assert len(train[-1]["perplexity"]) == 2
  assert any(r["split"] == "val" and "mse" in r for r in rows)
  assert (stage / "reconstructions.png").exists() and (stage / "config.json").exists()
  assert json.load(open(stage / "config.json"))["vqvae"]["hidden"] == 16
  assert "[vqvae] step 4/4" in result.stdout


def test_cli_unknown_key_and_bad_value_fail_naming_the_key(tmp_path):
  result = run_cli("--config=configs/demo.py:vqvae,tiny", f"--workdir={tmp_path}",
                   "--config.vqvae.hiden=3", timeout=120)
  assert result.returncode != 0 and "hiden" in result.stderr
  config = load_config("demo", "vqvae,tiny", **{"vqvae.upsample": "bogus"})
  with pytest.raises(ValueError, match="vqvae.upsample"):
    main.run_stage(config, str(tmp_path))
  with pytest.raises(ValueError, match="unknown preset"):
    load_config("demo", "vqvae,huge")
  with pytest.raises(ValueError, match="unknown stage"):
    load_config("demo", "train_everything")


def test_extract_without_stage1_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(StageMissingError, match="no vqvae checkpoint.*run the vqvae stage"):
    main.run_stage(load_config("demo", "extract,tiny"), str(tmp_path))


def test_stored_codes_decode_to_the_models_reconstruction(tiny_pipeline):
  config = load_config("demo", "extract,tiny")
  mesh = parallel.make_mesh(config.mesh)
  run = vqvae2_jax.load(tiny_pipeline, config=config, mesh=mesh)
  (model, variables), step = run.vqvae, run.vqvae_step
  extract_dir = os.path.join(tiny_pipeline, "extract")
  manifest = codes_lib.read_manifest(extract_dir)
  assert manifest["vqvae_step"] == step and manifest["levels"] == ["top", "bottom"]
  assert manifest["dtype"] == "uint8" and manifest["shapes"] == {"top": [4, 4],
                                                                  "bottom": [8, 8]}
  shards = codes_lib.CodeShards(extract_dir, "val")
  val = make_source(config.data, "val")
  assert len(shards) == len(val)
  stored = shards.take(np.arange(len(val)))
  batch = next(iter(iterate_once(val, len(val), process_index=0, process_count=1)))
  np.testing.assert_array_equal(stored["label"], batch["label"])
  from_codes = jax.jit(lambda v, c: model.apply(v, c, method=model.decode_codes))(
      variables, (stored["top"], stored["bottom"]))
  recon = jax.jit(lambda v, x: model.apply(v, x, method=model.reconstruct))(
      variables, image_lib.to_model(batch["image"]))
  np.testing.assert_allclose(from_codes, recon, atol=1e-5)


def test_extract_resumes_missing_shards(tiny_pipeline, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  shutil.copytree(os.path.join(tiny_pipeline, "vqvae"), os.path.join(workdir, "vqvae"))
  config = load_config("demo", "extract,tiny")
  main.run_stage(config, workdir)
  prefix = codes_lib.shard_prefix(os.path.join(workdir, "extract"), "train", 0)
  before = np.load(f"{prefix}.bottom.npy")
  os.remove(f"{prefix}.bottom.npy")
  main.run_stage(config, workdir)
  np.testing.assert_array_equal(np.load(f"{prefix}.bottom.npy"), before)


def test_priors_log_nll_and_sample_writes_outputs(tiny_pipeline):
  for level in ("top", "bottom"):
    rows = [json.loads(l) for l in open(os.path.join(tiny_pipeline, f"prior_{level}",
                                                     "metrics.jsonl"))]
    val = [r for r in rows if r["split"] == "val"][-1]
    assert np.isfinite(val["nll_nats"]) and abs(val["nll_bits"] * np.log(2) -
                                                 val["nll_nats"]) < 1e-6
  out = os.path.join(tiny_pipeline, "sample")
  data = np.load(os.path.join(out, "samples.npz"))
  n = len(data["label"])
  assert data["image"].shape == (n, 32, 32, 3) and data["image"].dtype == np.uint8
  assert data["top"].shape == (n, 4, 4) and data["bottom"].shape == (n, 8, 8)
  assert data["top"].max() < 16 and data["bottom"].max() < 16
  assert os.path.exists(os.path.join(out, "samples.png"))
  summary = json.load(open(os.path.join(out, "rejection.json")))
  assert summary["acceptance_rate"] == pytest.approx(0.25)
  assert summary["mean_score_accepted"] >= summary["mean_score_all"]


def test_sample_rejects_with_the_trained_classifier_despite_an_imagenet_class_map(
    tiny_pipeline, tmp_path):
  """class_map is for efficientnet_lite0's ImageNet classes; the trained classifier has
  the data's classes and ignores it (configs/imagenette64.py sets both)."""
  import shutil  # pylint: disable=g-import-not-at-top
  for stage in ("vqvae", "extract", "prior_top", "prior_bottom", "classifier"):
    shutil.copytree(os.path.join(tiny_pipeline, stage), os.path.join(tmp_path, stage))
  main.run_stage(load_config("demo", "sample,tiny", **{
      "sample.rejection.classifier": "trained",
      "sample.rejection.class_map": tuple(range(500, 532))}), str(tmp_path))
  summary = json.load(open(os.path.join(tmp_path, "sample", "rejection.json")))
  assert summary["accepted"] == summary["requested"]


def test_sample_refuses_a_prior_of_another_configuration(tiny_pipeline, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  for stage in ("vqvae", "extract", "prior_top", "prior_bottom"):
    shutil.copytree(os.path.join(tiny_pipeline, stage), os.path.join(tmp_path, stage))
  config = load_config("demo", "sample,tiny", **{"priors.top.hidden": 24,
                                                 "sample.rejection.classifier": "none"})
  # Set explicitly, a model field that contradicts the record fails before any work...
  with pytest.raises(ConfigConflictError, match="priors.top.hidden=24.*hidden=16"):
    main.run_stage(config, str(tmp_path), explicit=("priors.top.hidden",))
  # ...and a checkpoint whose record was lost still cannot be read into other shapes.
  os.remove(os.path.join(tmp_path, "prior_top", "config.json"))
  with pytest.raises(ckpt_lib.CheckpointError, match="prior_top.*another shape"):
    main.run_stage(config, str(tmp_path))


def test_cli_pipeline_runs_every_stage(tmp_path):
  """The README's main command, on the tiny preset: every stage in order, pictures at the end."""
  result = run_cli("--config=configs/demo.py:pipeline,tiny", f"--workdir={tmp_path}",
                   timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  for stage in ("vqvae", "extract", "prior_top", "prior_bottom", "classifier", "sample",
                "evaluate"):
    assert f"=== {stage} " in result.stdout
  for picture in ("vqvae/reconstructions.png", "sample/samples.png", "sample/rejection.png",
                  "evaluate/report.md"):
    assert (tmp_path / picture).exists(), picture
  assert "pipeline done" in result.stdout


def _copy_stages(tiny_pipeline, workdir, stages):
  import shutil  # pylint: disable=g-import-not-at-top
  for stage in stages:
    shutil.copytree(os.path.join(tiny_pipeline, stage), os.path.join(workdir, stage))


def test_sample_without_rejection_needs_no_classifier(tiny_pipeline, tmp_path):
  """keep_fraction=1 asks for no rejection: the demo's 'trained' rejection classifier is
  not needed, and a workdir without one samples every file."""
  _copy_stages(tiny_pipeline, tmp_path, ("vqvae", "extract", "prior_top", "prior_bottom"))
  config = load_config("demo", "sample,tiny", **{"sample.rejection.keep_fraction": 1.0})
  assert config.sample.rejection.classifier == "trained"
  main.run_stage(config, str(tmp_path))
  out = tmp_path / "sample"
  data = np.load(out / "samples.npz")
  assert len(data["image"]) == config.sample.num_images and np.isnan(data["scores"]).all()
  assert (out / "samples.png").exists() and not (out / "rejection.json").exists()


def test_sample_with_rejection_and_no_classifier_fails_before_drawing(tiny_pipeline, tmp_path):
  _copy_stages(tiny_pipeline, tmp_path, ("vqvae", "extract", "prior_top", "prior_bottom"))
  with pytest.raises(StageMissingError, match="classifier"):
    main.run_stage(load_config("demo", "sample,tiny"), str(tmp_path))
  assert not (tmp_path / "sample" / "samples.png").exists()


def test_sample_keeps_what_it_drew_when_rejection_fails(tiny_pipeline, tmp_path, monkeypatch):
  """A failure after the draw (here the classifier's scoring) loses none of the samples."""
  _copy_stages(tiny_pipeline, tmp_path, ("vqvae", "extract", "prior_top", "prior_bottom",
                                         "classifier"))

  def failing_scorer(self, kind, batch_size=32):
    del self, kind, batch_size
    def score(images):
      raise RuntimeError("scoring failed")
    return score
  monkeypatch.setattr(vqvae2_jax.api.Run, "scorer", failing_scorer)
  config = load_config("demo", "sample,tiny")
  with pytest.raises(RuntimeError, match="scoring failed"):
    main.run_stage(config, str(tmp_path))
  data = np.load(tmp_path / "sample" / "samples.npz")
  assert len(data["image"]) == 16 and data["image"].dtype == np.uint8  # 4 / 0.25 drawn
  assert set(data) >= {"top", "bottom", "label", "scores"}


def test_cli_misspelt_stage_or_preset_is_one_line_naming_the_choices(tmp_path):
  for arg, wrong in (("nosuchstage", "stage 'nosuchstage'"), ("vqvae,tinyy", "preset 'tinyy'")):
    result = run_cli(f"--config=configs/demo.py:{arg}", f"--workdir={tmp_path}", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and wrong in lines[0], lines[0]
    assert "Traceback" not in lines[0] and "File " not in lines[0]
    for choice in ("vqvae", "prior_top", "evaluate", "pipeline", "tiny", "bf16"):
      assert choice in lines[0], (choice, lines[0])
