"""Runs one stage, or the whole pipeline, from a config (what `main` calls).

Before a stage runs, its config's model fields are resolved against what the workdir
recorded (`Workdir.resolve_recorded`): a later stage needs no repeated override, and an
explicit override that contradicts a trained model fails here, before any work.
"""
from __future__ import annotations

import importlib
import time
from typing import Iterable

from vqvae2_jax import config_lib
from vqvae2_jax import parallel
from vqvae2_jax.workdir import Workdir

# stage -> module in vqvae2_jax.stages with a run(config, workdir) function.
STAGE_MODULES = {
    "vqvae": "vqvae_stage", "extract": "extract_stage", "prior_top": "prior_stage",
    "prior_mid": "prior_stage", "prior_bottom": "prior_stage",
    "classifier": "classifier_stage", "sample": "sample_stage",
    "evaluate": "evaluate_stage",
}


def pipeline_stages(config) -> list[str]:
  """The stages `pipeline` runs for `config`, in order: vqvae -> extract -> each prior ->
  classifier (when rejection sampling uses it) -> sample -> evaluate."""
  stages = ["vqvae", "extract"] + [f"prior_{l}" for l in config_lib.prior_levels(config)]
  if config.sample.rejection.classifier == "trained":
    stages.append("classifier")
  return stages + ["sample", "evaluate"]


def run_stage(config, workdir: str, explicit: Iterable[str] = ()) -> None:
  """Validates `config` and runs its stage on `workdir` (importable for notebooks, tests).

  Args:
    config: the experiment config with `config.stage` set.
    workdir: the experiment directory.
    explicit: dotted keys set explicitly on the command line (`--config.a.b=...`); only
      these may conflict with recorded model fields, and then fail.
  """
  explicit = tuple(explicit)
  config_lib.validate(config)
  if config.stage == "pipeline":
    _run_pipeline(config, workdir, explicit)
    return
  resolved = Workdir(workdir).resolve_recorded(config, explicit)
  config_lib.validate(resolved)
  module = importlib.import_module(f"vqvae2_jax.stages.{STAGE_MODULES[config.stage]}")
  module.run(resolved, workdir)


def _run_pipeline(config, workdir: str, explicit: tuple[str, ...]) -> None:
  """Every stage of `pipeline_stages` in one process; each resumes what it wrote."""
  start = time.time()
  for stage in pipeline_stages(config):
    stage_config = config.copy_and_resolve_references()
    with stage_config.unlocked():
      stage_config.stage = stage
    stage_config.lock()
    parallel.print0(f"=== {stage} ({time.time() - start:.0f}s since start) ===")
    run_stage(stage_config, workdir, explicit)
  parallel.print0(f"=== pipeline done in {time.time() - start:.0f}s. Pictures: {workdir}/vqvae/"
                  f"reconstructions.png, {workdir}/sample/samples.png, {workdir}/sample/"
                  f"rejection.png; report: {workdir}/evaluate/report.md ===")
