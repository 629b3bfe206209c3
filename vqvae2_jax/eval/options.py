"""The options every evaluator reads: plain values, built by the evaluate stage.

Field names are those of config.evaluate, so a bad value's message names the key to fix.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """How much to evaluate and how.

  num_images: accepted samples per keep fraction (50,000 for published FID / IS).
  batch_size: images per device call (a multiple of the mesh size).
  keep_fractions: rejection keep fractions of the trade-off, each in (0, 1].
  seed: candidate generation and precision/recall subsampling seed.
  max_real_images / mse_max_images / nll_max_batches: caps on the real data (0 = all).
  pr_max_images: feature rows kept per set for precision/recall (0 = all); pr_k: its k.
  is_splits: Inception Score splits. fid_method: 'eigh' (fast) or 'sqrtm' (pytorch-fid).
  cas: whether to compute the Classification Accuracy Score.
  cas_per_point: also train one CAS classifier per trade-off point (each keep fraction
    below 1 and each guidance scale), costing one classifier training each.
  guidance_scales: classifier-free guidance scales whose samples are evaluated beside
    the keep fractions (no rejection; the sampler's own scale is the keep-1 row).
  inception_weights / vgg16_weights / efficientnet_weights: weights files ('' = search
    the default places); fallback_network: 'efficientnet_lite0' or 'none', standing in
    for missing Inception / VGG-16 weights.
  """
  num_images: int = 512
  batch_size: int = 32
  keep_fractions: tuple[float, ...] = (1.0, 0.5, 0.25)
  seed: int = 1
  max_real_images: int = 0
  mse_max_images: int = 10_000
  nll_max_batches: int = 0
  pr_max_images: int = 10_000
  pr_k: int = 3
  is_splits: int = 10
  fid_method: str = "eigh"
  cas: bool = True
  cas_per_point: bool = False
  guidance_scales: tuple[float, ...] = ()
  inception_weights: str = ""
  vgg16_weights: str = ""
  efficientnet_weights: str = ""
  fallback_network: str = "efficientnet_lite0"

  def __post_init__(self):
    object.__setattr__(self, "keep_fractions", tuple(float(f) for f in self.keep_fractions))
    object.__setattr__(self, "guidance_scales",
                       tuple(float(w) for w in self.guidance_scales))
    for key, n in (("num_images", self.num_images),
                   ("max_real_images", self.max_real_images or 2)):
      if n < 2:
        raise ValueError(f"evaluate.{key}={n}: a covariance needs at least 2 images "
                         "(eval.metrics); evaluate more (50,000 for published FID)")
    if not self.keep_fractions or not all(0 < f <= 1 for f in self.keep_fractions):
      raise ValueError(f"evaluate.keep_fractions={self.keep_fractions}: each must be in "
                       "(0, 1]")
    if self.fid_method not in ("eigh", "sqrtm"):
      raise ValueError(f"evaluate.fid_method={self.fid_method!r}: use 'eigh' or 'sqrtm'")
    if self.fallback_network not in ("efficientnet_lite0", "none", ""):
      raise ValueError(f"evaluate.fallback_network={self.fallback_network!r}: use "
                       "'efficientnet_lite0' or 'none'")
    for key in ("inception_weights", "vgg16_weights", "efficientnet_weights"):
      path = getattr(self, key)
      if path and not os.path.isfile(path):
        raise FileNotFoundError(f"evaluate.{key}={path!r} does not exist; give the path of "
                                "the weights file (.pth or converted .npz), or '' to search "
                                "the default places")

  @classmethod
  def from_mapping(cls, values) -> "EvalOptions":
    """The options named in `values` (e.g. config.evaluate.to_dict()); others ignored."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
