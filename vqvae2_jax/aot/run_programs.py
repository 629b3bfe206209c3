"""The compile worker: builds a stage's programs for a TPU slice and compiles each.

Runs in a child process of `vqvae2_jax.compile` (which reads its output), so that a
compiler crash ends only the child. Each program prints one JSON line when it starts and
one with its figures (or its one-line error) when it ends.
"""
from __future__ import annotations

import json
import sys

from vqvae2_jax import config_lib
from vqvae2_jax import registry
from vqvae2_jax.aot import analysis
from vqvae2_jax.aot import programs as programs_lib
from vqvae2_jax.aot import topology as topology_lib


def default_num_classes(config, workdir: str | None) -> int:
  """Classes of the config's data set: the workdir's manifest, else known data sets."""
  if workdir:
    from vqvae2_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top
    try:
      return int(Workdir(workdir).manifest().get("num_classes", 0))
    except Exception:  # pylint: disable=broad-except
      pass  # no extraction yet: fall back to the data set
  data = config.data
  if data.source == registry.SOURCE_TFDS and data.tfds_name.startswith("imagenet2012"):
    return 1000
  if data.source == registry.SOURCE_DEMO:
    from vqvae2_jax.data import demo  # pylint: disable=g-import-not-at-top
    return len(demo.load_photos()[0])
  return 0


def emit(event: dict) -> None:
  print(json.dumps(event), flush=True)


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text[:400]


def compile_and_print(config, topology: str, num_classes: int, workdir: str | None) -> None:
  """Compiles every program of config.stage for `topology`; JSON lines on stdout."""
  try:
    if config.data.source == registry.SOURCE_FOLDER and not config.data.root:
      # The programs see shapes only; no image is read, so no folder is needed.
      config = config_lib.with_fields(config, {"data.root": "(not read by the compile check)"})
    config_lib.validate(config)
    slice_ = topology_lib.parse(topology)
    devices = topology_lib.slice_devices(slice_)
    if num_classes < 0:
      num_classes = default_num_classes(config, workdir)
    programs = programs_lib.stage_programs(config, config.stage, devices, num_classes)
  except Exception as e:  # pylint: disable=broad-except
    emit({"event": "error", "program": config.stage, "message": one_line(e)})
    sys.exit(0)
  for program in programs:
    emit({"event": "start", "program": program.name, **program.levers})
    try:
      row = analysis.analyse(program, slice_.chip, len(devices))
    except Exception as e:  # pylint: disable=broad-except
      emit({"event": "error", "program": program.name, **program.levers,
            "message": one_line(e)})
      continue
    emit({"event": "row", **row})
