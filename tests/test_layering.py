"""The house reads top-down: every module of the package sits in one layer and imports
only its own layer and the layers below it.

  layer        modules                                        why there
  entry        main, runner, compile, import_torch, aot/,     command lines and the tools
               any package's __main__ (codec/__main__)        they run; nothing imports them
                                                              but each other
  stages       stages/                                        one thin module per stage,
                                                              none importing another
  api          api, workdir, builders, restore, __init__      load a run: the layout, the
                                                              records, models built from them
  library      data/, train/, sampling/, eval/, codec/        the work itself, on built
                                                              models and plain options
  foundation   config_lib, registry, storage, images,         what every layer above uses;
               parallel, checkpoint, checkpoint_reads,        imports only models/ (plots
               integrity, plots                               draws a model's levels)
  models       models/                                        pure Linen, nothing of the
                                                              package but models/

Parses every module's imports (ast, including imports inside functions) and fails naming
each import that climbs a layer, each module no layer claims, and each stage importing
another. The checker runs on a directory, so the self-tests give it a synthetic package
in a temporary folder, never writing into this one.
"""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vqvae2_jax"

# Top first. Names are top-level modules, subpackages ('aot' covers aot/*) or
# 'package/module' for a single module of a subpackage; a package's __main__ is always
# an entry point.
LAYERS = (
    ("entry", ("main", "runner", "compile", "import_torch", "aot")),
    ("stages", ("stages",)),
    ("api", ("api", "workdir", "builders", "restore", "__init__")),
    ("library", ("data", "train", "sampling", "eval", "codec")),
    ("foundation", ("config_lib", "registry", "storage", "images", "parallel", "checkpoint",
                    "checkpoint_reads", "integrity", "plots")),
    ("models", ("models",)),
)


def unit(parts: tuple[str, ...]) -> str:
  """The layer-table name of a module given as dotted parts without the package name:
  ('eval', 'cas') -> 'eval'; ('codec', '__main__') -> 'codec/__main__'; ('api',) -> 'api';
  attribute parts after the module (('workdir', 'VQVAE')) do not matter."""
  if len(parts) >= 2 and parts[1] == "__main__":
    return f"{parts[0]}/__main__"
  return parts[0]


def layer_of(name: str, layers=LAYERS) -> int | None:
  """Index of the layer (0 = top) claiming a unit, or None."""
  if name.endswith("/__main__"):
    return 0
  for i, (_, units) in enumerate(layers):
    if name in units:
      return i
  return None


def module_parts(package: pathlib.Path, path: pathlib.Path) -> tuple[str, ...]:
  """('eval', 'cas') for <package>/eval/cas.py; ('__init__',) for <package>/__init__.py;
  ('eval',) for <package>/eval/__init__.py."""
  parts = path.relative_to(package).with_suffix("").parts
  if parts[-1] == "__init__" and len(parts) > 1:
    parts = parts[:-1]
  return parts


def imports_of(package: pathlib.Path, path: pathlib.Path) -> list[tuple[int, tuple[str, ...]]]:
  """(line, dotted parts after the package name) of every import of the package in a file.

  `from pkg import api` imports the module pkg.api; the bare package (`import pkg`,
  `from pkg import x`'s 'pkg') is its namespace, not a module of a layer, and is skipped.
  """
  name = package.name
  file_package = path.relative_to(package.parent).with_suffix("").parts[:-1]
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      modules = [a.name.split(".") for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against the file's package
        base = list(file_package[:len(file_package) - node.level + 1])
        module = base + (node.module.split(".") if node.module else [])
      else:
        module = (node.module or "").split(".")
      modules = [module + [a.name] for a in node.names]
    else:
      continue
    out += [(node.lineno, tuple(m[1:])) for m in modules if m[0] == name and len(m) > 1]
  return out


def layer_violations(package: pathlib.Path, layers=LAYERS) -> list[str]:
  """One line per module no layer claims and per import that climbs a layer."""
  bad = []
  for path in sorted(package.rglob("*.py")):
    here = unit(module_parts(package, path))
    rel = path.relative_to(package.parent)
    own = layer_of(here, layers)
    if own is None:
      bad.append(f"{rel}: no layer claims '{here}'; add it to LAYERS")
      continue
    for line, parts in imports_of(package, path):
      there = layer_of(unit(parts), layers)
      if there is None:
        bad.append(f"{rel}:{line} imports {'.'.join(parts)}, which no layer claims")
      elif there < own:
        bad.append(f"{rel}:{line} ({layers[own][0]}) imports {'.'.join(parts)} "
                   f"({layers[there][0]}, a layer above)")
  return bad


def stage_violations(package: pathlib.Path) -> list[str]:
  """One line per stage module importing another stage module."""
  bad = []
  for path in sorted((package / "stages").glob("*.py")):
    if path.name == "__init__.py":
      continue
    for line, parts in imports_of(package, path):
      if parts[0] == "stages" and len(parts) > 1:
        bad.append(f"{path.relative_to(package.parent)}:{line} imports "
                   f"{'.'.join(parts)}: stages talk through the workdir")
  return bad


def test_every_module_sits_in_a_layer_and_imports_only_down():
  bad = layer_violations(PACKAGE)
  assert not bad, "layering (see tests/test_layering.py):\n" + "\n".join(bad)


def test_stages_do_not_import_each_other():
  bad = stage_violations(PACKAGE)
  assert not bad, "\n".join(bad)


def test_the_layer_table_names_only_modules_that_exist():
  """A renamed or removed module leaves no stale row behind."""
  for _, units in LAYERS:
    for name in units:
      assert (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir(), name


# --------------------------------------------------------------- self-tests of the checker
def _package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  """A synthetic `vqvae2_jax` under `root`, with one file per top-level unit of LAYERS
  (empty) plus `files` ({'sampling/probe.py': source})."""
  package = root / "vqvae2_jax"
  for _, units in LAYERS:
    for name in units:
      target = package / (f"{name}.py" if (PACKAGE / f"{name}.py").exists()
                          else f"{name}/__init__.py")
      target.parent.mkdir(parents=True, exist_ok=True)
      target.touch()
  for rel, source in files.items():
    (package / rel).parent.mkdir(parents=True, exist_ok=True)
    (package / rel).write_text(source)
  return package


def test_the_checker_passes_a_package_that_imports_only_down(tmp_path):
  package = _package(tmp_path, {
      "stages/probe_stage.py": ("from vqvae2_jax import api\n"
                                "from vqvae2_jax.models import vqvae\n"),
      "sampling/probe.py": "from vqvae2_jax import parallel\nfrom . import hierarchical\n",
      "models/probe.py": "from vqvae2_jax.models import layers\nfrom .names import X\n",
      "codec/__main__.py": "from vqvae2_jax import api\n",
  })
  assert layer_violations(package) == [] and stage_violations(package) == []


def test_the_checker_sees_a_library_module_importing_stages(tmp_path):
  package = _package(tmp_path, {
      "sampling/probe.py": "def load():\n  from vqvae2_jax.stages import sample_stage\n"})
  bad = layer_violations(package)
  assert len(bad) == 1, bad
  assert "sampling/probe.py:2 (library) imports stages.sample_stage" in bad[0], bad


def test_the_checker_sees_a_models_module_importing_outside_models(tmp_path):
  for i, source in enumerate(("from vqvae2_jax import parallel\n",
                              "import vqvae2_jax.registry\n", "from .. import images\n")):
    package = _package(tmp_path / str(i), {"models/probe.py": source})
    bad = layer_violations(package)
    assert len(bad) == 1 and "models/probe.py:1 (models)" in bad[0], (source, bad)


def test_the_checker_sees_an_unassigned_module_and_a_stage_importing_a_stage(tmp_path):
  package = _package(tmp_path, {
      "newthing.py": "",
      "stages/a_stage.py": "from vqvae2_jax.stages import b_stage\n",
      "stages/b_stage.py": "",
  })
  assert any("no layer claims 'newthing'" in b for b in layer_violations(package))
  assert any("stages/a_stage.py:1" in b for b in stage_violations(package))
