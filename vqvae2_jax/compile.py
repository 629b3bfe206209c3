r"""Compile a stage's programs for a TPU slice on this host, before renting the slice.

  python -m vqvae2_jax.compile --config=configs/imagenet256.py:prior_top --topology=v5e-8
  python -m vqvae2_jax.compile --config=configs/ffhq1024.py:prior_bottom --topology=v5p-8 \
      --suggest [--config.<key>=<value> ...]

For the stage's programs (the train step with its configured remat / grad_accum_steps /
fsdp; extract's encoder; the incremental sampler's loop; evaluate's feature network;
`pipeline`: all of them) XLA's TPU compiler (libtpu: pip install -e '.[tpu]') compiles for
the slice's devices on this CPU host, with no TPU and no network, and the table gives per
chip: argument and temporary bytes, the peak against the chip's HBM, FLOPs, bytes
accessed, the compiler's roofline time, and from them the step-time lower bound, images
(or latents) per second per chip and the MFU bound (`vqvae2_jax/aot/analysis.py`).

It exits 1 with one line when a program does not fit or does not compile. Every compile
runs in a child process: a compiler crash is reported as one line naming the program and
its levers, never as a segfault of this command. `--suggest` searches the train step's
levers (remat, grad_accum_steps, fsdp) for the cheapest setting that fits and prints the
`--config.` overrides. `--json=<file>` also writes the rows.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from absl import app
from absl import flags

from vqvae2_jax import main as cli  # the --config flag, its parsing and one-line errors
from vqvae2_jax.aot import report
from vqvae2_jax.aot import topology as topology_lib

_TOPOLOGY = flags.DEFINE_string(
    "topology", None, f"TPU slice, e.g. {topology_lib.EXAMPLES}")
_SUGGEST = flags.DEFINE_bool(
    "suggest", False, "search remat / grad_accum_steps / fsdp for the cheapest setting "
    "that fits and print the --config overrides")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", -1, "classes of the data set for class-conditional priors (-1: the "
    "workdir's extraction manifest, else known data sets: ImageNet 1000, the demo's)")
_JSON = flags.DEFINE_string("json", "", "also write the rows to this JSON file")
_TIMEOUT = flags.DEFINE_integer("timeout", 1800, "seconds one compile may take")
_WORKER = flags.DEFINE_bool("compile_worker", False, "internal: compile in this process "
                            "and print one JSON line per program")


def _worker() -> None:
  """Child side: builds and compiles the stage's programs, one JSON line each."""
  from vqvae2_jax.aot import run_programs  # pylint: disable=g-import-not-at-top
  run_programs.compile_and_print(cli._CONFIG.value, _TOPOLOGY.value,  # pylint: disable=protected-access
                                 _NUM_CLASSES.value, cli._WORKDIR.value)  # pylint: disable=protected-access


def compile_in_child(extra_args: list[str]) -> tuple[list[dict], str]:
  """Runs this command as a compile worker with `extra_args` (lever overrides).

  Returns (rows, failure): the rows of the programs that compiled and '' or a one-line
  description of what stopped the rest (compile error, crash, time-out).
  """
  args = [a for a in sys.argv[1:] if not a.startswith(("--suggest", "--nosuggest",
                                                        "--json"))]
  cmd = [sys.executable, "-m", "vqvae2_jax.compile", *args, *extra_args, "--compile_worker"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile-only executables cannot be loaded back
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=_TIMEOUT.value, check=False)
  except subprocess.TimeoutExpired:
    return [], f"compiling took longer than --timeout={_TIMEOUT.value} s"
  return report.parse_worker_output(proc.stdout, proc.stderr, proc.returncode)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if cli._CONFIG.value is None or not _TOPOLOGY.value:  # pylint: disable=protected-access
    raise app.UsageError("--config=configs/<experiment>.py:<stage> and --topology=<slice> "
                         "are required")
  if _WORKER.value:
    _worker()
    return
  try:
    slice_ = topology_lib.parse(_TOPOLOGY.value)
  except topology_lib.TopologyError as e:
    cli._fail(str(e))  # pylint: disable=protected-access
  config = cli._CONFIG.value  # pylint: disable=protected-access
  print(report.header(config.stage, slice_), flush=True)
  if _SUGGEST.value:
    from vqvae2_jax.aot import suggest  # pylint: disable=g-import-not-at-top
    rows, failure = suggest.search(config, slice_, compile_in_child,
                                   log=lambda line: print(line, flush=True))
  else:
    rows, failure = compile_in_child([])
    for row in rows:
      print(report.format_row(row), flush=True)
  for movers in filter(None, map(report.format_movers, rows)):
    print(movers, flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"stage": config.stage, "topology": slice_.name, "rows": rows,
                 "failure": failure}, f, indent=1)
  if failure:
    cli._fail(failure)  # pylint: disable=protected-access


if __name__ == "__main__":
  signal.signal(signal.SIGINT, signal.default_int_handler)
  app.run(main, flags_parser=cli.parse_flags)
