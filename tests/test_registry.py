"""vqvae2_jax.registry: the names the package shares, and that no other module spells
its tuples of them again."""
import ast
import pathlib

import pytest

from vqvae2_jax import config_lib
from vqvae2_jax import registry
from vqvae2_jax import runner

from helpers import load_config


def test_prior_stage_names_round_trip():
  for level in ("top", "mid", "bottom", "level3"):
    assert registry.prior_level(registry.prior_stage(level)) == level
  for stage in (registry.VQVAE, registry.EXTRACT, registry.CLASSIFIER, registry.SAMPLE,
                registry.EVALUATE, registry.PIPELINE):
    assert registry.prior_level(stage) is None
  assert registry.PRIOR_STAGES == ("prior_top", "prior_mid", "prior_bottom")


def test_every_stage_has_a_module_and_a_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  for stage in registry.STAGES:
    if stage != registry.PIPELINE:
      assert importlib.util.find_spec(f"vqvae2_jax.stages.{runner.stage_module(stage)}")
    config = load_config("ffhq1024", stage)  # three levels: every prior stage exists
    assert config.stage == stage


def test_config_level_names_match_the_model():
  from vqvae2_jax.models import vqvae  # pylint: disable=g-import-not-at-top
  for n in (1, 2, 3, 4):
    config = config_lib.base_config()
    config.vqvae.num_levels = n
    assert config_lib.prior_levels(config) == vqvae.level_names(n) == registry.level_names(n)


def test_the_pipeline_asks_for_the_classifier_only_for_trained_rejection():
  config = load_config("demo", "pipeline,tiny")
  assert registry.CLASSIFIER in runner.pipeline_stages(config)
  with config.unlocked():
    config.sample.rejection.classifier = registry.REJECT_NONE
  assert runner.pipeline_stages(config) == [
      "vqvae", "extract", "prior_top", "prior_bottom", "sample", "evaluate"]


@pytest.mark.parametrize("key, values", [
    ("vqvae.upsample", registry.UPSAMPLE_MODES), ("vqvae.architecture", registry.ARCHITECTURES),
    ("data.source", registry.DATA_SOURCES), ("data.on_bad_image", registry.ON_BAD_IMAGE),
    ("vqvae_train.dtype", registry.DTYPES), ("vqvae_train.remat", registry.REMAT_MODES),
    ("sample.sampler", registry.SAMPLERS),
    ("sample.rejection.classifier", registry.REJECTION_KINDS)])
def test_validate_accepts_each_registry_value_and_names_them_for_another(key, values):
  for value in values:
    overrides = {key: value, "data.root": "/images"}
    config_lib.validate(load_config("demo", "vqvae", **overrides))
  with pytest.raises(ValueError, match=f"config.{key}='bogus'.*{values[-1]}"):
    config_lib.validate(load_config("demo", "vqvae", **{key: "bogus"}))


def test_evaluate_defaults_are_the_configs():
  assert config_lib.base_config().evaluate.to_dict() == registry.EVALUATE_DEFAULTS


def _registry_tuples() -> dict[frozenset, str]:
  """{values: registry name} of every tuple of two or more names the registry spells."""
  named = {f"LEVEL_NAMES[{n}]": v for n, v in registry.LEVEL_NAMES.items()}
  named.update((k, v) for k, v in vars(registry).items() if isinstance(v, tuple))
  return {frozenset(v): k for k, v in named.items()
          if len(v) >= 2 and all(isinstance(x, str) for x in v)}


def _redeclared(source: str, tuples: dict[frozenset, str]) -> list[tuple[int, str]]:
  """(line, registry name) of each tuple / list / set literal of strings in `source`
  holding the same names as a registry tuple (in any order)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
      name = tuples.get(frozenset(e.value for e in node.elts))
      if name:
        found.append((node.lineno, name))
  return found


def test_no_module_redeclares_a_registry_tuple():
  """A module states a shared tuple of names by importing it, never as its own literal."""
  tuples = _registry_tuples()
  assert _redeclared('SAMPLERS = ("reference", "incremental")\nx = ["val", "train"]',
                     tuples) == [(1, "SAMPLERS"), (2, "SPLITS")]
  package = pathlib.Path(registry.__file__).parent
  homes = {package / "registry.py", package / "models" / "names.py"}
  found = [f"{path.relative_to(package)}:{line} re-spells {name}"
           for path in sorted(package.rglob("*.py")) if path not in homes
           for line, name in _redeclared(path.read_text(), tuples)]
  assert not found


def test_every_remat_mode_but_none_has_a_policy():
  from vqvae2_jax.models import remat  # pylint: disable=g-import-not-at-top
  assert set(remat.REMAT_POLICIES) == set(registry.REMAT_MODES) - {registry.REMAT_NONE}
  for mode in registry.REMAT_MODES:
    remat.check_mode(mode)


def test_mesh_axes_are_the_parallel_layouts():
  from vqvae2_jax import parallel  # pylint: disable=g-import-not-at-top
  assert parallel.BATCH_AXES == registry.MESH_AXES
  assert dict(config_lib.DEFAULT_AXIS_RULES)["batch"] == registry.MESH_AXES
