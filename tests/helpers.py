"""Shared test utilities: configs by path, random prior parameters without PRNG kernels."""
import importlib.util
import os
import re

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


# Report keys whose values are timings or paths, which differ between equal runs.
TIMINGS = re.compile(r"seconds|per_s$|^workdir$")


def report_figures(report, path=""):
  """{path: value} of every number and string of a report, timings left out."""
  if isinstance(report, dict):
    out = {}
    for k, v in report.items():
      if not TIMINGS.search(k):
        out.update(report_figures(v, f"{path}/{k}"))
    return out
  if isinstance(report, list):
    out = {f"{path}#len": len(report)}
    for i, v in enumerate(report):
      out.update(report_figures(v, f"{path}[{i}]"))
    return out
  return {path: report}
