"""Pieces every stage uses: runtime setup and rebuilding stage 1's model from a config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vqvae2_jax import parallel
from vqvae2_jax.models.vqvae import VQVAE2


def setup_runtime(config) -> Mesh:
  """Initialises multi-host JAX if asked and builds the configured mesh."""
  parallel.maybe_initialize_distributed(config.distributed)
  return parallel.make_mesh(config.mesh)


def build_vqvae(config, dtype=None) -> VQVAE2:
  """The stage-1 model of `config` (compute dtype from vqvae_train.dtype by default)."""
  v = config.vqvae
  return VQVAE2(num_levels=v.num_levels, bottom_down=v.bottom_down, hidden=v.hidden, res_hidden=v.res_hidden,
                num_res_layers=v.num_res_layers, num_codes=v.num_codes,
                code_dim=v.code_dim, decay=v.decay, epsilon=v.epsilon,
                dead_code_threshold=v.dead_code_threshold, upsample=v.upsample,
                dtype=dtype or parallel.to_dtype(config.vqvae_train.dtype))


def vqvae_init_fn(model: VQVAE2, image_size: int):
  """rng -> variables of `model` for [1, S, S, 3] images (used for init and restore)."""
  def init(rng):
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return model.init({"params": rng}, x, train=False)
  return init


def prior_level_info(manifest: dict, level: str) -> tuple[int, tuple[str, ...], tuple[int, ...]]:
  """(index of `level`, names of the levels above it, their upsampling scales to it)."""
  levels = tuple(manifest["levels"])
  if level not in levels:
    raise ValueError(f"level {level!r} is not one of the extracted levels {levels}")
  index = levels.index(level)
  size = manifest["shapes"][level][0]
  scales = tuple(size // manifest["shapes"][u][0] for u in levels[:index])
  return index, levels[:index], scales


def build_prior(config, level: str, manifest: dict, dtype=None):
  """The PixelSNAILPrior of `level` (config.priors[level]) for the extracted codes."""
  from vqvae2_jax.models.prior import PixelSNAILPrior  # pylint: disable=g-import-not-at-top
  p = config.priors[level]
  _, upper, scales = prior_level_info(manifest, level)
  num_classes = int(manifest.get("num_classes", 0)) if p.class_conditional else 0
  return PixelSNAILPrior(
      num_codes=int(manifest["num_codes"]), hidden=p.hidden, res_hidden=p.res_hidden,
      num_layers=p.num_layers, attention_every=p.attention_every, num_heads=p.num_heads,
      kernel_size=p.kernel_size, dropout=p.dropout, attn_dropout=p.attn_dropout,
      num_output_layers=p.num_output_layers, num_cond_layers=p.num_cond_layers,
      num_cond_levels=len(upper), cond_scales=scales, num_classes=num_classes,
      dtype=dtype or parallel.to_dtype(p.train.dtype))


def prior_init_fn(prior, manifest: dict, level: str):
  """rng -> the prior's variables, traced with one example of each input."""
  _, upper, _ = prior_level_info(manifest, level)
  def init(rng):
    codes = jnp.zeros((1, *manifest["shapes"][level]), jnp.int32)
    cond = tuple(jnp.zeros((1, *manifest["shapes"][u]), jnp.int32) for u in upper)
    labels = jnp.zeros((1,), jnp.int32) if prior.num_classes else None
    return prior.init({"params": rng}, codes, cond, labels, train=False)
  return init


def load_vqvae(config, workdir: str, mesh):
  """(model, variables, step) of the trained stage-1 checkpoint in `workdir`."""
  from vqvae2_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.train import loop  # pylint: disable=g-import-not-at-top
  model = build_vqvae(config)
  try:
    state, record = loop.restore_state(
        workdir, "vqvae", vqvae_init_fn(model, config.data.image_size),
        config.vqvae_train, mesh, config.axis_rules)
  except ckpt_lib.CheckpointError as e:
    raise ckpt_lib.CheckpointError(f"stage-1 (vqvae) checkpoint: {e}") from e
  return model, {"params": state.params, **state.model_state}, int(record["step"])


def load_prior(config, workdir: str, level: str, manifest: dict, mesh):
  """(prior module, params) of `prior_<level>`, the parameter EMA when it was kept."""
  from vqvae2_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.train import loop  # pylint: disable=g-import-not-at-top
  prior = build_prior(config, level, manifest)
  t = config.priors[level].train
  try:
    state, _ = loop.restore_state(workdir, f"prior_{level}",
                                  prior_init_fn(prior, manifest, level), t, mesh,
                                  config.axis_rules)
  except ckpt_lib.CheckpointError as e:
    raise ckpt_lib.CheckpointError(
        f"prior_{level} checkpoint: {e} (train it with the prior_{level} stage)") from e
  return prior, (state.ema_params if t.param_ema_decay > 0 else state.params)
