"""Paper Table 1: train / validation NLL of each trained prior on the extracted code
shards (EMA parameters when kept) and train / validation MSE of the VQ-VAE.

Report key: 'table1' (`eval.table1.table1`).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from vqvae2_jax import registry
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data.sources import make_source
from vqvae2_jax.eval import table1
from vqvae2_jax.eval.evaluators.common import Result
from vqvae2_jax.eval.evaluators.inputs import EvalInputs


class Table1:
  """NLL of each prior with a checkpoint, MSE of the VQ-VAE (mse_max_images,
  nll_max_batches, batch_size of EvalOptions)."""

  def __init__(self, inputs: EvalInputs):
    self.inputs = inputs

  @classmethod
  def from_config(cls, settings: Mapping[str, Any], inputs: EvalInputs) -> "Table1":
    del settings  # mse_max_images and nll_max_batches are EvalOptions fields
    return cls(inputs)

  def _priors(self) -> tuple[dict[str, table1.LevelPrior], list[str]]:
    """(level -> the prior to score, splits of the codes), noting what is missing."""
    inputs = self.inputs
    run, w, log = inputs.run, inputs.run.workdir, inputs.log
    try:
      manifest = run.manifest
    except FileNotFoundError as err:  # the workdir's StageMissingError: run `extract`
      log.note(f"prior NLL skipped: {err}")
      return {}, []
    priors = {}
    for level in manifest["levels"]:
      name = registry.prior_stage(level)
      if level not in inputs.config.priors or not run.has(name):
        log.note(f"{name}: no checkpoint, its NLL is skipped (train it with the {name} "
                 "stage)")
        continue
      kind = "ema" if w.inference_params_key(name) == "ema_params" else "raw"
      priors[level] = table1.LevelPrior(*run.prior(level), inputs.builders.upper_levels(manifest, level), kind)
    return priors, manifest["splits"]

  def run(self) -> Iterator[Result]:
    inputs = self.inputs
    priors, splits = self._priors()
    shards = {split: codes_lib.CodeShards(inputs.run.workdir.extract_dir, split)
              for split in splits}
    sources = {split: make_source(inputs.config.data, split) for split in registry.SPLITS}
    yield "table1", table1.table1(*inputs.run.vqvae, sources, priors, shards, inputs.opts,
                                  inputs.log)
