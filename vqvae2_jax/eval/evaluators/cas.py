"""Classification Accuracy Score (paper Table 2): classifiers trained on samples (and the
one trained on real data) tested on the real validation images and their
reconstructions.

Report key: 'cas' ('<classifier>_on_real' / '_on_recon' -> top-1, top-5, images). The
classifiers and their accuracies are shared inputs (`EvalInputs.cas_classifiers`,
`EvalInputs.cas_accuracy`): the validation pass that tests them also computes the real
images' statistics, and the trade-off rows carry each point's CAS.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from vqvae2_jax.eval.evaluators.common import Result
from vqvae2_jax.eval.evaluators.inputs import EvalInputs


class ClassificationAccuracyScore:
  """Top-1 / top-5 of every CAS classifier (evaluate.cas, evaluate.cas_per_point)."""

  def __init__(self, inputs: EvalInputs):
    self.inputs = inputs

  @classmethod
  def from_config(cls, settings: Mapping[str, Any], inputs: EvalInputs
                  ) -> "ClassificationAccuracyScore":
    del settings  # cas and cas_per_point are EvalOptions fields (inputs.opts)
    return cls(inputs)

  def run(self) -> Iterator[Result]:
    accuracy = self.inputs.cas_accuracy
    if accuracy is not None:
      yield "cas", accuracy
