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
  return VQVAE2(num_levels=v.num_levels, hidden=v.hidden, res_hidden=v.res_hidden,
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
