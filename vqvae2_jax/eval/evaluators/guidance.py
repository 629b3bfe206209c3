"""Classifier-free guidance beside rejection: the sample metrics of each scale in
evaluate.guidance_scales (other than the sampler's own), and one picture of the same
draws at every scale.

Report keys: 'guidance' (a row per scale, `tradeoff.tradeoff_rows` with CAS columns),
'guidance_grid' (the picture's file name).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from vqvae2_jax import images as image_lib
from vqvae2_jax.eval import tradeoff
from vqvae2_jax.eval.evaluators.common import Figure, Result
from vqvae2_jax.eval.evaluators.inputs import EvalInputs

GUIDANCE_GRID = "guidance.png"  # every guidance scale on the same draws


class Guidance:
  """FID / IS / precision-recall (and CAS) of each guidance scale's samples."""

  def __init__(self, inputs: EvalInputs):
    self.inputs = inputs

  @classmethod
  def from_config(cls, settings: Mapping[str, Any], inputs: EvalInputs) -> "Guidance":
    del settings  # guidance_scales is an EvalOptions field: CAS trains on these samples too
    return cls(inputs)

  def run(self) -> Iterator[Result]:
    inputs = self.inputs
    guided = inputs.guided
    if not guided or inputs.real_reference is None:
      return
    rows = [row for w, drawn in guided.items() for row in inputs.sample_rows(drawn, w)]
    yield "guidance", rows
    by_scale = {inputs.base_guidance: inputs.candidates.candidates,
                **{w: drawn.candidates for w, drawn in guided.items()}}
    tiles, cols, names, captions = tradeoff.guidance_grid(by_scale,
                                                          inputs.run.class_names or [])
    if len(tiles):
      yield Figure(GUIDANCE_GRID, lambda path: image_lib.save_grid(
          path, tiles, cols, row_labels=[n[:14] for n in names], captions=captions))
      yield "guidance_grid", GUIDANCE_GRID
