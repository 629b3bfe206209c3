"""Rate-distortion of the image codec against JPEG, WebP and the raw index cost
(`eval.rate_distortion`) on evaluate.rate_distortion_images validation images (0 = off).

Report key: 'rate_distortion'; picture `rate_distortion.PLOT_NAME`.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from vqvae2_jax import registry
from vqvae2_jax.codec import stream as codec_stream
from vqvae2_jax.data.sources import make_source, spread_subset
from vqvae2_jax.eval import rate_distortion
from vqvae2_jax.eval.evaluators.common import Figure, Result
from vqvae2_jax.eval.evaluators.inputs import EvalInputs


class RateDistortion:
  """The codec's bits per pixel and PSNR / SSIM against JPEG, WebP and raw indices."""

  def __init__(self, inputs: EvalInputs, num_images: int):
    """num_images: validation images compared (spread over the split; 0 = off)."""
    self.inputs, self.num_images = inputs, num_images

  @classmethod
  def from_config(cls, settings: Mapping[str, Any], inputs: EvalInputs) -> "RateDistortion":
    return cls(inputs, int(settings.get("rate_distortion_images", 0)))

  def run(self) -> Iterator[Result]:
    inputs = self.inputs
    if not self.num_images:
      return
    if inputs.sampler is None:  # (the codec models the codes with every prior)
      inputs.log.note("rate-distortion skipped: the codec needs every prior trained")
      return
    source = spread_subset(make_source(inputs.config.data, registry.VAL), self.num_images)
    images = np.stack([source.get(i)[0] for i in range(len(source))])
    run = inputs.run
    inputs.log(f"rate-distortion of the codec on {len(images)} validation images")
    header = codec_stream.unpack(run.compress(images[:1])[0])[0].size_bytes
    result = rate_distortion.rate_distortion(
        images, run.compress, run.decompress,
        latents_per_image=sum(int(np.prod(s)) for s in run.manifest["shapes"].values()),
        num_codes=int(run.manifest["num_codes"]), header_bytes=header,
        code_length_bits=lambda streams: run.log_prob(
            images, [codec_stream.unpack(s)[0].label for s in streams]
            if run.num_classes and run.codec.conditional else None)["bits"])
    yield Figure(rate_distortion.PLOT_NAME, lambda path: rate_distortion.plot(result, path))
    yield "rate_distortion", result
