"""Recorded config -> Linen modules and their init functions (no I/O).

Every stage, the Python API and the notebook build models here, from a config whose model
fields were resolved against the workdir's records (`Workdir.resolve_recorded`), so one
definition maps config fields to module attributes.
"""
from __future__ import annotations

__all__ = ["build_vqvae", "vqvae_init_fn", "code_shapes", "prior_level_info", "build_prior",
           "build_public_prior", "prior_init_fn", "build_classifier", "classifier_init_fn"]

from typing import Callable

import jax
import jax.numpy as jnp

from vqvae2_jax import parallel
from vqvae2_jax import registry
from vqvae2_jax.eval.classifier import ResNetClassifier, classifier_init_fn
from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.models.public_pixelsnail import PublicPixelSNAIL
from vqvae2_jax.models.public_vqvae import PublicVQVAE
from vqvae2_jax.models.quantizer import CodebookOptions
from vqvae2_jax.models.vqvae import VQVAE2, level_strides

InitFn = Callable[[jax.Array], dict]  # rng -> Flax variables (params possibly boxed)


def build_vqvae(config, dtype=None) -> VQVAE2:
  """The stage-1 model of `config` (compute dtype from vqvae_train.dtype by default);
  vqvae.architecture 'public' gives the public PyTorch code's variant (PublicVQVAE)."""
  v = config.vqvae
  cls = PublicVQVAE if v.get("architecture", registry.PAPER) == registry.PUBLIC else VQVAE2
  return cls(num_levels=v.num_levels, bottom_down=v.bottom_down, hidden=v.hidden,
             res_hidden=v.res_hidden, num_res_layers=v.num_res_layers,
             num_codes=v.num_codes, code_dim=v.code_dim, decay=v.decay,
             epsilon=v.epsilon, dead_code_threshold=v.dead_code_threshold,
             upsample=v.upsample, remat=config.vqvae_train.remat,
             dtype=dtype or parallel.to_dtype(config.vqvae_train.dtype),
             codebook_options=CodebookOptions.from_config(v))


def vqvae_init_fn(model: VQVAE2, image_size: int) -> InitFn:
  """rng -> variables of `model` for [1, S, S, 3] images (used for init and restore)."""
  def init(rng):
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return model.init({"params": rng}, x, train=False)
  return init


def code_shapes(config) -> dict[str, tuple[int, int]]:
  """{level: (H_l, W_l)} of the codes stage 1 of `config` produces, top first."""
  v, size = config.vqvae, config.data.image_size
  return {n: (size // s, size // s) for n, s in
          zip(registry.level_names(v.num_levels), level_strides(v.num_levels, v.bottom_down))}


def prior_level_info(manifest: dict, level: str
                     ) -> tuple[int, tuple[str, ...], tuple[int, ...]]:
  """(index of `level`, names of the levels above it, their upsampling scales to it)."""
  levels = tuple(manifest["levels"])
  if level not in levels:
    raise ValueError(f"level {level!r} is not one of the extracted levels {levels}")
  index = levels.index(level)
  size = manifest["shapes"][level][0]
  scales = tuple(size // manifest["shapes"][u][0] for u in levels[:index])
  return index, levels[:index], scales


def build_prior(config, level: str, manifest: dict, dtype=None) -> PixelSNAILPrior:
  """The PixelSNAILPrior of `level` (config.priors[level]) for the extracted codes
  (PublicPixelSNAIL for priors.<level>.architecture 'public')."""
  p = config.priors[level]
  _, upper, scales = prior_level_info(manifest, level)
  if p.get("architecture", registry.PAPER) == registry.PUBLIC:
    return build_public_prior(p, int(manifest["num_codes"]), len(upper), scales,
                              dtype or parallel.to_dtype(p.train.dtype))
  num_classes = int(manifest.get("num_classes", 0)) if p.class_conditional else 0
  # Configs recorded before label_dropout existed lack the field: 0 (no null label).
  label_dropout = float(p.get("label_dropout", 0.0)) if num_classes else 0.0
  return PixelSNAILPrior(
      num_codes=int(manifest["num_codes"]), hidden=p.hidden, res_hidden=p.res_hidden,
      num_layers=p.num_layers, attention_every=p.attention_every, num_heads=p.num_heads,
      kernel_size=p.kernel_size, dropout=p.dropout, attn_dropout=p.attn_dropout,
      num_output_layers=p.num_output_layers, num_cond_layers=p.num_cond_layers,
      num_cond_levels=len(upper), cond_scales=scales, num_classes=num_classes,
      remat=p.train.remat, dtype=dtype or parallel.to_dtype(p.train.dtype),
      null_label=label_dropout > 0, label_dropout=label_dropout,
      scan_layers=bool(p.get("scan_layers", False)))


def build_public_prior(p, num_codes: int, num_cond_levels: int, scales: tuple[int, ...],
                       dtype) -> PublicPixelSNAIL:
  """The public PyTorch code's PixelSNAIL from a 'public' priors.<level> section: one
  dropout for blocks and attention, attention in every block or in none."""
  if p.attention_every not in (0, 1) or (p.attention_every and p.attn_dropout != p.dropout):
    raise ValueError(f"the public PixelSNAIL has attention in every block or none "
                     f"(attention_every 1 or 0, got {p.attention_every}) and one dropout "
                     f"(attn_dropout {p.attn_dropout} must equal dropout {p.dropout})")
  if p.class_conditional:
    raise ValueError("the public PixelSNAIL is unconditional: set class_conditional=False")
  return PublicPixelSNAIL(
      num_codes=num_codes, hidden=p.hidden, res_hidden=p.res_hidden,
      kernel_size=p.kernel_size, num_layers=p.num_layers, res_per_block=p.res_per_block,
      attention=p.attention_every == 1, num_heads=p.num_heads, dropout=p.dropout,
      num_output_layers=p.num_output_layers, num_cond_layers=p.num_cond_layers,
      num_cond_levels=num_cond_levels, cond_scales=tuple(scales), dtype=dtype)


def prior_init_fn(prior: PixelSNAILPrior, manifest: dict, level: str) -> InitFn:
  """rng -> the prior's variables, traced with one example of each input."""
  _, upper, _ = prior_level_info(manifest, level)

  def init(rng):
    codes = jnp.zeros((1, *manifest["shapes"][level]), jnp.int32)
    cond = tuple(jnp.zeros((1, *manifest["shapes"][u]), jnp.int32) for u in upper)
    labels = jnp.zeros((1,), jnp.int32) if prior.num_classes else None
    return prior.init({"params": rng}, codes, cond, labels, train=False)
  return init


def build_classifier(config, num_classes: int) -> ResNetClassifier:
  """The ResNet classifier of config.classifier for `num_classes` labels."""
  c = config.classifier
  return ResNetClassifier(num_classes=num_classes, width=c.width,
                          stage_sizes=(c.depth,) * 3, dropout_rate=0.1,
                          input_pool=c.input_pool)
