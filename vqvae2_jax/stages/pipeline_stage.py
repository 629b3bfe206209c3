"""Every stage of an experiment in order, in one process (the demo's main job).

vqvae -> extract -> prior_<level> for each level -> classifier (when the data has
labels and rejection sampling uses it) -> sample -> evaluate. Each stage resumes from
what it already wrote, so rerunning the pipeline continues where it stopped.
"""
from __future__ import annotations

import time

from vqvae2_jax import parallel
from vqvae2_jax import config_lib


def stage_list(config) -> list[str]:
  """The stages the pipeline runs for `config`, in order."""
  stages = ["vqvae", "extract"] + [f"prior_{l}" for l in config_lib.prior_levels(config)]
  if config.sample.rejection.classifier == "trained":
    stages.append("classifier")
  return stages + ["sample", "evaluate"]


def run(config, workdir: str) -> None:
  """Runs every stage of `stage_list` on `workdir`."""
  from vqvae2_jax.runner import run_stage  # pylint: disable=g-import-not-at-top
  start = time.time()
  for stage in stage_list(config):
    stage_config = config.copy_and_resolve_references()
    with stage_config.unlocked():
      stage_config.stage = stage
    parallel.print0(f"=== {stage} ({time.time() - start:.0f}s since start) ===")
    run_stage(stage_config, workdir)
  parallel.print0(f"=== pipeline done in {time.time() - start:.0f}s. Pictures: {workdir}/vqvae/"
        f"reconstructions.png, {workdir}/sample/samples.png, {workdir}/sample/rejection.png"
        " ===")
