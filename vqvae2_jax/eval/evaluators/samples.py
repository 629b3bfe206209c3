"""Sample distances: the feature networks, FID of reconstructions, and FID / IS / FID* /
precision-recall of the samples at each rejection keep fraction (paper Figure 7).

Report keys: 'networks' (`FeatureNetworks`); 'reconstructions', 'rejection_classifier',
'samples' (the keep-1 row), 'tradeoff' (a row per keep fraction, `tradeoff.tradeoff_rows`
with CAS columns), 'self_judged' and 'self_judged_warning' (`SampleDistances`).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from vqvae2_jax.eval import tradeoff
from vqvae2_jax.eval.evaluators.common import Result
from vqvae2_jax.eval.evaluators.inputs import EvalInputs


class FeatureNetworks:
  """Which feature networks judge the images: role -> their info and label, or None."""

  def __init__(self, inputs: EvalInputs):
    self.inputs = inputs

  @classmethod
  def from_config(cls, settings: Mapping[str, Any], inputs: EvalInputs) -> "FeatureNetworks":
    del settings  # the weights paths and fallback are EvalOptions (inputs.opts)
    return cls(inputs)

  def run(self) -> Iterator[Result]:
    fid, pr = self.inputs.networks
    yield "networks", {r: (n.info | {"label": n.label}) if n else None
                       for r, n in (("fid", fid), ("precision_recall", pr))}


class SampleDistances:
  """FID of reconstructions; FID / FID* / IS / precision-recall of each keep fraction's
  selection of the candidates, with the rejection scorer and the self-judged flag."""

  def __init__(self, inputs: EvalInputs):
    self.inputs = inputs

  @classmethod
  def from_config(cls, settings: Mapping[str, Any], inputs: EvalInputs) -> "SampleDistances":
    del settings  # num_images, keep_fractions, pr_k, ... are EvalOptions (inputs.opts)
    return cls(inputs)

  def run(self) -> Iterator[Result]:
    inputs, log = self.inputs, self.inputs.log
    fid, pr = inputs.networks
    drawn, selector = inputs.candidates, inputs.selector  # drawn before the validation pass
    if drawn is not None and selector is not None:
      yield "rejection_classifier", selector.name
    if fid is None and pr is None:
      log.note("FID, IS, FID* and precision/recall skipped: no feature network could be "
               "loaded (give config.evaluate.inception_weights, or the EfficientNet-Lite0 "
               "weights for the fallback)")
      return
    real = inputs.real_reference
    if fid is not None:
      metrics, notes = real.reconstruction_metrics()
      log.note(*notes)
      yield "reconstructions", metrics
    if drawn is None:
      return
    rows = inputs.sample_rows(drawn, inputs.base_guidance)
    yield "samples", rows[0]
    yield "tradeoff", rows
    if selector is None:
      return
    judged = tradeoff.self_judged(selector.network, fid and fid.name, pr and pr.name)
    yield "self_judged", bool(judged)
    if judged:
      warning = tradeoff.self_judged_warning(selector.name, judged)
      yield "self_judged_warning", warning
      log.note(warning)
      log(warning)
