"""Shared test utilities: configs by path, random prior parameters without PRNG kernels."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(experiment: str, arg: str, **overrides):
  """configs/<experiment>.py:get_config(arg), with dotted overrides applied (unlocked)."""
  path = os.path.join(ROOT, "configs", f"{experiment}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{experiment}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  with config.unlocked():
    for dotted, value in overrides.items():
      *parents, last = dotted.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[last] = value
  return config


def numpy_params(model, codes, cond, labels, seed=0):
  """Random 'params' for `model` from numpy (fast on CPU: no PRNG kernels to compile)."""
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), codes, cond, labels, train=False)))["params"]
  rng = np.random.default_rng(seed)

  def fill(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 10
    return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree.map(fill, shapes)
