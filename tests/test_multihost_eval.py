"""extract, sample and evaluate on 2 processes x 2 devices == 1 process x 4 devices.

The tiny pipeline is trained once (the session's `tiny_pipeline` workdir) and copied
twice. In one copy a single 4-device process runs `sample` and `evaluate`; in the other
two `jax.distributed` processes on 127.0.0.1 (launch/local_multiprocess.py, each wrapped
in its timeout) extract the codes again with grain worker processes, then run `sample`
and `evaluate`. The codes, the samples, the evaluation candidates and every figure of
the report must agree (timings aside). In one process, `extract` reads with grain workers
and resumes several missing shards in one pass.
"""
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

from vqvae2_jax import main
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.stages import extract_stage

from helpers import load_config, report_figures
from test_multihost import can_bind_localhost, run_side_by_side

# Sharing the session-wide tiny pipeline: the tests of the group run in one xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_pipeline")
needs_localhost = pytest.mark.skipif(
    not can_bind_localhost(),
    reason="cannot bind a TCP port on 127.0.0.1 for the jax.distributed coordinator")

# One trade-off point's CAS classifier (not one per point) and no codec comparison keep
# the runs short; CAS, FID, IS, precision/recall and the trade-off stay in.
EVALUATE_FLAGS = ("--config.evaluate.cas_per_point=False",
                  "--config.evaluate.rate_distortion_images=0")
# Figures that are wall-clock measurements, not results.


def stage(name, workdir, *flags):
  """The shell words of one stage; "$@" takes the launcher's distributed flags."""
  return (f"{sys.executable} -m vqvae2_jax.main --config=configs/demo.py:{name},tiny "
          f"--workdir={workdir} {' '.join(flags)} \"$@\"")


def chain(*commands):
  """argv running the stage commands in order, stopping at the first failure."""
  return ["sh", "-c", " && ".join(commands), "sh"]


@pytest.fixture(scope="module")
def runs(tiny_pipeline, tmp_path_factory):
  """(single workdir, multi workdir, multi log) after both runs."""
  root = tmp_path_factory.mktemp("multihost_eval")
  single, multi = str(root / "single"), str(root / "multi")
  for copy in (single, multi):
    shutil.copytree(tiny_pipeline, copy)
    for done in ("sample", "evaluate"):  # other tests of the group may have run them
      shutil.rmtree(os.path.join(copy, done), ignore_errors=True)
  shutil.rmtree(os.path.join(multi, "extract"))
  multi_out = run_side_by_side(
      root, list(chain(stage("sample", single), stage("evaluate", single, *EVALUATE_FLAGS))),
      list(chain(stage("extract", multi, "--config.data.worker_count=1"),
                 stage("sample", multi), stage("evaluate", multi, *EVALUATE_FLAGS))),
      timeout=400)
  assert "process 1 of 2, 2 local / 4 global devices" in multi_out
  return single, multi, multi_out


@needs_localhost
def test_extract_on_two_processes_with_workers_writes_the_same_codes(runs):
  single, multi, _ = runs
  names = sorted(os.listdir(os.path.join(single, "extract", "train")))
  for split in ("train", "val"):
    files = sorted(os.listdir(os.path.join(multi, "extract", split)))
    assert files == sorted(os.listdir(os.path.join(single, "extract", split)))
    for name in files:
      np.testing.assert_array_equal(np.load(os.path.join(multi, "extract", split, name)),
                                    np.load(os.path.join(single, "extract", split, name)))
  assert any(n.endswith(".bottom.npy") for n in names)
  manifests = [json.load(open(os.path.join(w, "extract", "manifest.json")))
               for w in (single, multi)]
  assert manifests[0] == manifests[1]


@needs_localhost
def test_sample_on_two_processes_draws_and_rejects_the_same_images(runs):
  single, multi, _ = runs
  a, b = (np.load(os.path.join(w, "sample", "samples.npz")) for w in (single, multi))
  assert sorted(a.files) == sorted(b.files)
  for key in a.files:
    if key == "scores":
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(b[key], a[key], err_msg=key)
  ra, rb = (json.load(open(os.path.join(w, "sample", "rejection.json")))
            for w in (single, multi))
  assert ra["accepted"] == rb["accepted"] == ra["requested"]
  assert ra["mean_score_accepted"] == pytest.approx(rb["mean_score_accepted"], rel=1e-5)
  assert os.path.exists(os.path.join(multi, "sample", "rejection.png"))


@needs_localhost
def test_evaluate_on_two_processes_reports_the_samereport_figures(runs):
  single, multi, _ = runs
  # The candidates each process drew its rows of are the single process's, image by image.
  cands = [np.load(os.path.join(w, "evaluate", "candidates", "images.npy"))
           for w in (single, multi)]
  np.testing.assert_array_equal(cands[1], cands[0])
  a, b = (json.load(open(os.path.join(w, "evaluate", "report.json"))) for w in (single, multi))
  # The figures the comparison must hold: distances, the trade-off and CAS.
  for row in a["tradeoff"]:
    assert all(row.get(k) is not None and math.isfinite(row[k])
               for k in ("fid", "fid_star", "is_mean", "precision", "recall",
                         "mean_class_score"))
  assert [r["keep_fraction"] for r in a["tradeoff"]] == [1.0, 0.5]
  assert a["tradeoff"][0]["cas_top1"] is not None and "sample_trained_on_real" in a["cas"]
  fa, fb = report_figures(a), report_figures(b)
  assert sorted(fa) == sorted(fb)
  for key, value in fa.items():
    if isinstance(value, float):
      assert fb[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    else:
      assert fb[key] == value, key
  assert os.path.exists(os.path.join(multi, "evaluate", "report.md"))


def test_extract_reads_with_grain_workers_and_resumes_missing_shards_in_one_pass(
    tiny_pipeline, tmp_path, monkeypatch):
  # 16-image shards: the 64 training images make four; the second and fourth go missing.
  monkeypatch.setattr(extract_stage, "IMAGES_PER_SHARD_BATCHES", 2)
  passes = []

  def recorded_iterate_once(source, batch_size, **kwargs):
    passes.append((len(source), kwargs))
    return real_iterate_once(source, batch_size, **kwargs)

  real_iterate_once = extract_stage.iterate_once
  monkeypatch.setattr(extract_stage, "iterate_once", recorded_iterate_once)
  workdir = str(tmp_path)
  shutil.copytree(os.path.join(tiny_pipeline, "vqvae"), os.path.join(workdir, "vqvae"))
  config = load_config("demo", "extract,tiny", **{"data.worker_count": 1,
                                                  "data.num_threads": 2})
  main.run_stage(config, workdir)
  assert passes == [(64, dict(num_threads=2, worker_count=1)),
                    (8, dict(num_threads=2, worker_count=1))]
  out = os.path.join(workdir, "extract")
  files = sorted(os.listdir(os.path.join(out, "train")))
  assert len(files) == 4 * 4  # top, bottom, label, index of each shard
  first = {f: np.load(os.path.join(out, "train", f)) for f in files}
  for shard in (1, 3):
    os.remove(codes_lib.shard_prefix(out, "train", shard) + ".bottom.npy")
  passes.clear()
  main.run_stage(config, workdir)
  assert [n for n, _ in passes] == [32]  # one pass over the two missing shards
  for f in files:
    np.testing.assert_array_equal(np.load(os.path.join(out, "train", f)), first[f], f)
  # Row for row the codes of the one-shard extraction of the tiny pipeline.
  for split, n in (("train", 64), ("val", 8)):
    ours = codes_lib.CodeShards(out, split).take(np.arange(n))
    ref = codes_lib.CodeShards(os.path.join(tiny_pipeline, "extract"), split).take(
        np.arange(n))
    for key in ref:
      np.testing.assert_array_equal(ours[key], ref[key], f"{split} {key}")
