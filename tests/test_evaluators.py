"""The evaluators (eval.evaluators): what each yields, shared inputs computed once, and
the stage's report from evaluators run in any order."""
import json
import os
import shutil

import pytest

from vqvae2_jax import main
from vqvae2_jax import parallel
from vqvae2_jax.eval import cas
from vqvae2_jax.eval import distances
from vqvae2_jax.eval import evaluators
from vqvae2_jax.eval import report as report_lib
from vqvae2_jax.eval import tradeoff
from vqvae2_jax.eval.evaluators import inputs as inputs_lib
from vqvae2_jax.eval.options import EvalOptions
from vqvae2_jax.stages import evaluate_stage

from helpers import load_config, report_figures


class _Counter:
  """Wraps `fn`, counting calls (and recording their `name=` keyword)."""

  def __init__(self, fn):
    self.fn, self.calls, self.names = fn, 0, []

  def __call__(self, *args, **kwargs):
    self.calls += 1
    self.names.append(kwargs.get("name"))
    return self.fn(*args, **kwargs)


class _Workdir:
  def __init__(self):
    self.manifest_checks = 0

  def has_manifest(self):
    self.manifest_checks += 1
    return False


class _UntrainedRun:
  """A run with stage 1 only: no codes, so no sampler."""
  level_names = ("top", "bottom")
  config = None

  def __init__(self):
    self.workdir = _Workdir()


def test_shared_inputs_are_computed_once_and_missing_ones_are_noted_once(monkeypatch):
  resolve = _Counter(lambda opts, log: (None, None, ["no feature network weights"]))
  monkeypatch.setattr(distances, "resolve_networks", resolve)
  run = _UntrainedRun()
  log = evaluators.EvalLog("test")
  inputs = evaluators.EvalInputs(run, EvalOptions(), log, "trained", builders=None)
  results = {}
  for name, cls in evaluators.EVALUATORS.items():
    if name != "table1":  # (it scores the VQ-VAE, which this run does not have)
      results[name] = [r[0] for r in cls.from_config({"rate_distortion_images": 4},
                                                     inputs).run()]
  assert results == {"networks": ["networks"], "samples": [], "guidance": [], "cas": [],
                     "rate_distortion": []}
  # The networks (FeatureNetworks, SampleDistances, the validation pass) and the
  # sampler (candidates, CAS, guidance, rate-distortion) were each looked up once.
  assert resolve.calls == 1 and run.workdir.manifest_checks == 1
  assert log.notes[0] == "no feature network weights"
  assert sum(n.startswith("sample metrics (FID") for n in log.notes) == 1
  assert "rate-distortion skipped: the codec needs every prior trained" in log.notes


def test_table1_notes_codes_that_are_not_extracted(monkeypatch):
  class Run(_UntrainedRun):
    @property
    def manifest(self):
      raise FileNotFoundError("no extraction manifest: run the extract stage")

  log = evaluators.EvalLog("test")
  inputs = evaluators.EvalInputs(Run(), EvalOptions(), log, "none", builders=None)
  priors, splits = evaluators.EVALUATORS["table1"](inputs)._priors()
  assert (priors, splits) == ({}, [])
  assert log.notes == ["prior NLL skipped: no extraction manifest: run the extract stage"]


def test_rate_distortion_reads_its_own_key():
  assert evaluators.EVALUATORS["rate_distortion"].from_config({}, None).num_images == 0
  off = evaluators.EVALUATORS["rate_distortion"].from_config(
      {"rate_distortion_images": 0}, None)
  assert list(off.run()) == []


@pytest.mark.xdist_group("tiny_pipeline")
def test_evaluators_in_reverse_order_give_the_stage_report(tiny_pipeline, tmp_path,
                                                            monkeypatch):
  """The stage once (counting the expensive calls), then each evaluator alone, last first,
  over fresh inputs: every evaluator yields its keys and the figures are the stage's."""
  workdir = str(tmp_path / "w")
  shutil.copytree(tiny_pipeline, workdir)
  shutil.rmtree(os.path.join(workdir, "evaluate"), ignore_errors=True)
  counters = {"networks": _Counter(distances.resolve_networks),
              "candidates": _Counter(tradeoff.generate_candidates),
              "validation_pass": _Counter(inputs_lib.validation_pass),
              "classifiers": _Counter(cas.train_classifier)}
  monkeypatch.setattr(distances, "resolve_networks", counters["networks"])
  monkeypatch.setattr(tradeoff, "generate_candidates", counters["candidates"])
  monkeypatch.setattr(inputs_lib, "validation_pass", counters["validation_pass"])
  monkeypatch.setattr(cas, "train_classifier", counters["classifiers"])
  config = load_config("demo", "evaluate,tiny")
  main.run_stage(config, workdir)
  stage_report = json.load(open(os.path.join(workdir, "evaluate", "report.json")))
  # Used by several evaluators, computed once: the networks, the candidates, the one
  # validation pass (reference statistics and CAS), each CAS classifier.
  assert {k: c.calls for k, c in counters.items() if k != "classifiers"} == {
      "networks": 1, "candidates": 1, "validation_pass": 1}
  names = counters["classifiers"].names
  assert len(names) == len(set(names)) == 2  # sample_trained, sample_keep0.5_trained

  with_networks = stage_report["networks"]["fid"] is not None
  expected = {
      "networks": {"networks"}, "table1": {"table1"},
      "samples": ({"rejection_classifier", "reconstructions", "samples", "tradeoff",
                   "self_judged"} if with_networks else {"rejection_classifier"}),
      "guidance": set(), "cas": {"cas"}, "rate_distortion": {"rate_distortion"}}
  merged = {k: stage_report[k] for k in ("experiment", "workdir", "settings", "vqvae_step")}
  # The stage's context (runner.run_stage enters it around the stage's run).
  with parallel.use_mesh(parallel.make_mesh(config.mesh), config.axis_rules):
    inputs = evaluate_stage.open_inputs(config, workdir)
    built = dict(zip(evaluators.EVALUATORS, evaluators.from_config(config.evaluate, inputs)))
    for name in reversed(list(built)):
      results = [r for r in built[name].run() if not isinstance(r, evaluators.Figure)]
      assert {key for key, _ in results} == expected[name], name
      merged.update(results)
  merged["notes"] = inputs.log.notes
  again = report_lib.write(merged, str(tmp_path / "again"))
  assert sorted(again["notes"]) == sorted(stage_report["notes"])
  again["notes"] = stage_report["notes"]  # (their order follows the evaluators')
  assert report_figures(again) == report_figures(stage_report)
  assert counters["networks"].calls == 2 and counters["validation_pass"].calls == 2
