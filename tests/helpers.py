"""Shared test utilities: configs by path, random prior parameters without PRNG kernels."""
import importlib.util
import os

from vqvae2_jax.train import state as state_lib

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
  """Random prior 'params' for these inputs, from NumPy (no PRNG kernels to compile)."""
  return state_lib.numpy_params(
      lambda k: model.init(k, codes, cond, labels, train=False), seed)
