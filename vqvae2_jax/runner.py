"""Runs one stage from a config (what `main` and the `pipeline` stage call)."""
from __future__ import annotations

import importlib

from vqvae2_jax import config_lib

# stage -> module in vqvae2_jax.stages with a run(config, workdir) function.
STAGE_MODULES = {
    "vqvae": "vqvae_stage", "extract": "extract_stage", "prior_top": "prior_stage",
    "prior_mid": "prior_stage", "prior_bottom": "prior_stage",
    "classifier": "classifier_stage", "sample": "sample_stage",
    "evaluate": "evaluate_stage", "pipeline": "pipeline_stage",
}


def run_stage(config, workdir: str) -> None:
  """Validates `config` and runs its stage (importable for notebooks and tests)."""
  config_lib.validate(config)
  module = importlib.import_module(f"vqvae2_jax.stages.{STAGE_MODULES[config.stage]}")
  module.run(config, workdir)
