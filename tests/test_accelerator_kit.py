"""benchmarks/accelerator.py --small runs every section on the CPU and writes its JSON."""
import json
import os
import sys

from helpers import ROOT


def test_accelerator_kit_small(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import accelerator  # pylint: disable=g-import-not-at-top
  out = tmp_path / "acc.json"
  accelerator.main(["--small", "--out", str(out)])
  report = json.load(open(out))
  for section in ("memory", "stage1", "priors", "sampling", "paper_sampling"):
    assert "error" not in report[section], report[section]
  assert report["stage1"]["train"]["images_per_sec"] > 0
  assert report["stage1"]["train"]["flops_per_step"] > 0
  assert set(report["priors"]) == {"top", "bottom"}
  assert report["priors"]["top"]["latents_per_sec"] > 0
  assert report["sampling"]["top"]["speedup"] > 1
  assert report["sampling"]["bottom"]["incremental_over_forward"] > 0
  paper = report["paper_sampling"]
  assert paper["batches"][str(paper["best_batch"])]["samples_per_s"] > 0
  assert paper["hours_for_50k_samples"] > 0
  for step in ("vqvae", "prior_top"):  # the plan next to the measured peak (None on CPU)
    assert report["memory"][step]["plan_bytes"]["peak"] > 0
    assert "measured_peak_bytes" in report["memory"][step]
