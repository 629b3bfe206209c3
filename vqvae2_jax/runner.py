"""Runs one stage, or the whole pipeline, from a config (what `main` calls).

Before a stage runs, its config's model fields are resolved against what the workdir
recorded (`Workdir.resolve_recorded`): a later stage needs no repeated override, and an
explicit override that contradicts a trained model fails here, before any work. Every
stage runs inside its config's device mesh and logical axis rules (`parallel.use_mesh`),
entered here once: the library below reads them from the context.
"""
from __future__ import annotations

import importlib
import time
from typing import Iterable

from vqvae2_jax import config_lib
from vqvae2_jax import parallel
from vqvae2_jax import registry
from vqvae2_jax.workdir import Workdir


def stage_module(stage: str) -> str:
  """The module in vqvae2_jax.stages with the stage's run(config, workdir) function:
  '<stage>_stage', one module for every level's prior ('prior_stage')."""
  return ("prior" if registry.prior_level(stage) is not None else stage) + "_stage"


def pipeline_stages(config) -> list[str]:
  """The stages `pipeline` runs for `config`, in order: vqvae -> extract -> each prior ->
  classifier (when rejection sampling uses it) -> sample -> evaluate."""
  stages = [registry.VQVAE, registry.EXTRACT] + [
      registry.prior_stage(l) for l in config_lib.prior_levels(config)]
  if config.sample.rejection.classifier == registry.REJECT_TRAINED:
    stages.append(registry.CLASSIFIER)
  return stages + [registry.SAMPLE, registry.EVALUATE]


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
  if config.stage == registry.PIPELINE:
    _run_pipeline(config, workdir, explicit)
    return
  resolved = Workdir(workdir).resolve_recorded(config, explicit)
  config_lib.validate(resolved)
  module = importlib.import_module(f"vqvae2_jax.stages.{stage_module(config.stage)}")
  with parallel.use_mesh(parallel.setup_runtime(resolved), resolved.axis_rules):
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
