"""Shared test utilities: loading configs/<experiment>.py by path."""
import importlib.util
import os

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
