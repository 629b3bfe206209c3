"""The house reads top-down: stages -> api / workdir / builders / restore -> library -> models.

Parses every module's imports (ast, including imports inside functions) and fails naming
each import that climbs back up a layer.
"""
import ast
import pathlib

import pytest

from vqvae2_jax import config_lib
from vqvae2_jax.models import vqvae

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vqvae2_jax"
LIBRARY = ("data", "train", "sampling", "eval", "codec")
# Modules above the library: nothing in the library (or models) may import them.
UPPER = ("vqvae2_jax.stages", "vqvae2_jax.api", "vqvae2_jax.workdir",
         "vqvae2_jax.builders", "vqvae2_jax.restore", "vqvae2_jax.runner",
         "vqvae2_jax.main", "vqvae2_jax.compile", "vqvae2_jax.aot")


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, absolute module name) of every import in a file."""
  tree = ast.parse(path.read_text())
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against the file's package
        base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level])
        module = f"{base}.{node.module}" if node.module else base
      else:
        module = node.module or ""
      # `from vqvae2_jax import api` imports the module vqvae2_jax.api.
      out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
      out.append((node.lineno, module))
  return out


def violations(files, allowed) -> list[str]:
  bad = []
  for f in files:
    for line, module in imports_of(f):
      if module.startswith("vqvae2_jax") and not allowed(module):
        bad.append(f"{f.relative_to(PACKAGE.parent)}:{line} imports {module}")
  return sorted(set(bad))


def _is_upper(module: str) -> bool:
  return any(module == u or module.startswith(u + ".") for u in UPPER)


def test_models_import_only_models():
  files = list((PACKAGE / "models").rglob("*.py"))
  bad = violations(files, lambda m: m in ("vqvae2_jax", "vqvae2_jax.models")
                   or m.startswith("vqvae2_jax.models."))
  assert not bad, "models/ must import nothing of the package but models/:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", LIBRARY)
def test_library_never_imports_upper_layers(layer):
  # A package's __main__.py is an entry point (like main.py): it may load a run.
  files = [f for f in (PACKAGE / layer).rglob("*.py") if f.name != "__main__.py"]
  bad = violations(files, lambda m: not _is_upper(m))
  assert not bad, f"{layer}/ imports a layer above it:\n" + "\n".join(bad)


def test_api_layer_never_imports_stages():
  files = [PACKAGE / f"{m}.py" for m in ("api", "workdir", "builders", "restore")]
  bad = violations(files, lambda m: not m.startswith("vqvae2_jax.stages")
                   and m not in ("vqvae2_jax.runner", "vqvae2_jax.main"))
  assert not bad, "\n".join(bad)


def test_stages_do_not_import_each_other_or_the_runner():
  files = [f for f in (PACKAGE / "stages").glob("*.py") if f.name != "__init__.py"]
  bad = violations(files, lambda m: not m.startswith("vqvae2_jax.stages.")
                   and m not in ("vqvae2_jax.runner", "vqvae2_jax.main"))
  assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
  """The test itself can fail: a library file importing stages/ is caught."""
  f = PACKAGE / "sampling" / "_layering_probe.py"
  try:
    f.write_text("def load():\n  from vqvae2_jax.stages import sample_stage\n")
    bad = violations([f], lambda m: not _is_upper(m))
  finally:
    f.unlink()
  assert any("vqvae2_jax.stages.sample_stage" in b for b in bad), bad


def test_config_level_names_match_the_model():
  for n in (1, 2, 3, 4):
    config = config_lib.base_config()
    config.vqvae.num_levels = n
    assert config_lib.prior_levels(config) == vqvae.level_names(n)
