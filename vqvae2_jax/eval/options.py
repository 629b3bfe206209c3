"""The options every evaluator reads: plain values, built by the evaluate stage.

Field names are those of config.evaluate, so a bad value's message names the key to fix.
"""
from __future__ import annotations

import dataclasses
import os

from vqvae2_jax import registry

_DEFAULTS = registry.EVALUATE_DEFAULTS


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
  num_images: int = _DEFAULTS["num_images"]
  batch_size: int = _DEFAULTS["batch_size"]
  keep_fractions: tuple[float, ...] = _DEFAULTS["keep_fractions"]
  seed: int = _DEFAULTS["seed"]
  max_real_images: int = _DEFAULTS["max_real_images"]
  mse_max_images: int = _DEFAULTS["mse_max_images"]
  nll_max_batches: int = _DEFAULTS["nll_max_batches"]
  pr_max_images: int = _DEFAULTS["pr_max_images"]
  pr_k: int = _DEFAULTS["pr_k"]
  is_splits: int = _DEFAULTS["is_splits"]
  fid_method: str = _DEFAULTS["fid_method"]
  cas: bool = _DEFAULTS["cas"]
  cas_per_point: bool = _DEFAULTS["cas_per_point"]
  # Not the config's (1.0,): without the key (a mapping from before guidance scales)
  # no guided samples are drawn. The two agree for an unguided sampler, since the
  # sampler's own scale is left out (the keep-1 row measures it).
  guidance_scales: tuple[float, ...] = ()
  inception_weights: str = _DEFAULTS["inception_weights"]
  vgg16_weights: str = _DEFAULTS["vgg16_weights"]
  efficientnet_weights: str = _DEFAULTS["efficientnet_weights"]
  fallback_network: str = _DEFAULTS["fallback_network"]

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
    if self.fid_method not in registry.FID_METHODS:
      raise ValueError(f"evaluate.fid_method={self.fid_method!r}: use one of "
                       f"{registry.FID_METHODS}")
    if self.fallback_network not in registry.FALLBACK_NETWORKS + ("",):  # '' = none
      raise ValueError(f"evaluate.fallback_network={self.fallback_network!r}: use one of "
                       f"{registry.FALLBACK_NETWORKS}")
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
