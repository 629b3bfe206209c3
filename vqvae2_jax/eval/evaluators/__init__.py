"""The evaluate stage's evaluators, one per metric family (big_vision style).

Each is built from its own keys of config.evaluate and the run's shared `EvalInputs`
(`from_config(settings, inputs)`); `run()` yields (report key, value) pairs and
`Figure`s. The expensive inputs several evaluators use (candidate samples, feature
networks, the validation pass, the CAS classifiers) are memoised in `EvalInputs`, so
the evaluators depend on no order. They run in the order of `EVALUATORS`, which is the
order of their notes in the report.
"""
from __future__ import annotations

from typing import Any, Mapping

from vqvae2_jax.eval.evaluators.cas import ClassificationAccuracyScore
from vqvae2_jax.eval.evaluators.common import EvalLog, Evaluator, Figure, Result
from vqvae2_jax.eval.evaluators.guidance import Guidance
from vqvae2_jax.eval.evaluators.inputs import Drawn, EvalInputs, RunBuilders
from vqvae2_jax.eval.evaluators.rate_distortion import RateDistortion
from vqvae2_jax.eval.evaluators.samples import FeatureNetworks, SampleDistances
from vqvae2_jax.eval.evaluators.table1 import Table1

# name -> evaluator class, in the order they run.
EVALUATORS: dict[str, type] = {
    "networks": FeatureNetworks,           # report 'networks'
    "table1": Table1,                      # 'table1'
    "samples": SampleDistances,            # 'reconstructions', 'samples', 'tradeoff', ...
    "guidance": Guidance,                  # 'guidance', 'guidance_grid'
    "cas": ClassificationAccuracyScore,    # 'cas'
    "rate_distortion": RateDistortion,     # 'rate_distortion'
}


def from_config(settings: Mapping[str, Any], inputs: EvalInputs) -> list[Evaluator]:
  """Every evaluator of `EVALUATORS` for config.evaluate `settings` (each turns itself
  off by its own keys: cas, guidance_scales, rate_distortion_images, ...)."""
  return [cls.from_config(settings, inputs) for cls in EVALUATORS.values()]


__all__ = ["EVALUATORS", "from_config", "EvalInputs", "RunBuilders", "Drawn", "EvalLog",
           "Evaluator", "Figure", "Result"]
