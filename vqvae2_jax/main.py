r"""Command-line entry for every stage.

  python -m vqvae2_jax.main --config=configs/<experiment>.py:<stage>[,<preset>...] \
      --workdir=<dir> [--config.<key>=<value> ...]

Stages (`registry.STAGES`): vqvae, extract, prior_<level>, classifier, sample, evaluate,
and pipeline (all of them in order). Each reads what earlier stages wrote under the same
workdir. A misspelt stage or preset fails in one line naming every stage and preset.

Known errors (bad config values or keys, missing or corrupt checkpoints, data problems,
a diverged run) print one line `error: <message>` on stderr and exit 1; `--debug` or
`--verbosity=1` shows the traceback. A preempted training stage (SIGTERM) saves, prints
`preempted: saved step N` and exits 0; rerunning the same command resumes it.
"""
from __future__ import annotations

import difflib
import logging as py_logging
import os
import signal
import sys



def _exit_on_sigterm(signum, frame):
  """SIGTERM outside a training loop (loops install their own, which saves first): exit 0
  at once. Nothing needs saving: stages that write as they go write each file atomically
  and resume what is on disk (extract's shards), the others redo their work. An
  exception would not do: generic `except Exception` handlers could swallow it."""
  del signum, frame
  print("preempted outside training: nothing to save; rerun the same command.", flush=True)
  os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":  # from the start: SIGTERM while importing exits cleanly too
  signal.signal(signal.SIGTERM, _exit_on_sigterm)

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import config_lib
from vqvae2_jax import registry
from vqvae2_jax import storage
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data.errors import DataError
from vqvae2_jax.runner import run_stage
from vqvae2_jax.train.guard import NonFiniteLossError

__all__ = ["run_stage"]

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"configs/<experiment>.py:<stage>[,<preset>...]; stages: "
    f"{', '.join(registry.STAGES)}", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this experiment's stages.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of known errors.")

# Errors whose message says what is wrong and what to do: one line, no traceback.
# ValueError covers config_lib.validate and ConfigConflictError (one of its subclasses).
KNOWN_ERRORS = (ckpt_lib.CheckpointError, DataError, NonFiniteLossError, ValueError,
                workdir_lib.ConfigConflictError, workdir_lib.StageMissingError)


class _QuietLibraryInfo(py_logging.Filter):
  """Drops INFO records of libraries (orbax: several per save; JAX: the probe for a TPU
  on every start) so progress lines stay readable; warnings and errors pass, and
  `--verbosity=1` shows everything."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING or logging.get_verbosity() >= 1
            or f"{os.sep}vqvae2_jax{os.sep}" in record.pathname)


def _fail(message: str) -> None:
  """Prints `error: <message>` as one line on stderr and exits 1."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(1)


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(_flat_keys(value, f"{prefix}{key}."))
  return keys


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
  """'unknown config key vqvae.hiden; closest: vqvae.hidden, ...' for a dotted key."""
  keys = _flat_keys(config)
  section = key.rsplit(".", 1)[0] + "." if "." in key else ""
  # Siblings first (a typo in the last part), then the whole tree.
  close = difflib.get_close_matches(key, [k for k in keys if k.startswith(section)], 3, 0.6)
  close += [k for k in difflib.get_close_matches(key, keys, 3, 0.5) if k not in close]
  hint = f"closest: {', '.join(close[:3])}" if close else "no close match"
  return f"unknown config key {key!r} ({hint}); see the experiment's configs/*.py"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config override of an unknown key reported as one line
  naming it and the closest valid keys (ml_collections raises a bare AttributeError)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is None:
      raise
    config = flags.FLAGS["config"].parser.parse(config_arg)
    keys = set(_flat_keys(config))
    for arg in argv:
      if arg.startswith("--config.") or arg.startswith("--noconfig."):
        key = arg.split("=", 1)[0].split(".", 1)[1]
        if key not in keys:
          _fail(unknown_key_message(config, key))
    _fail(f"bad --config override: {e}")
  except flags.Error as e:
    arg_error = _config_arg_error(e)
    _fail(str(arg_error) if arg_error else f"{e} (see --helpfull)")
  return []


def _config_arg_error(error: BaseException) -> config_lib.ConfigArgError | None:
  """The unknown stage / preset error behind a flag error, as the config file raised it.

  ml_collections re-raises an error of a config file as the same type with the whole
  traceback as its message, and absl wraps that in a flag error; the first one raised
  (the end of the chain) has the one-line message."""
  found = None
  while error is not None:
    if isinstance(error, config_lib.ConfigArgError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def _show_tracebacks() -> bool:
  return _DEBUG.value or logging.get_verbosity() >= 1


def _fallback_command(error: ckpt_lib.CorruptCheckpointError, workdir: str) -> str:
  """The command that retrains the stage owning a corrupt checkpoint from the newest step
  that verifies, when the checkpoint is one of `workdir`'s stages ('' otherwise)."""
  stage_dir = storage.dirname(error.directory)
  if storage.dirname(stage_dir) != storage.absolute(workdir):
    return ""
  stage = storage.basename(stage_dir)
  config_arg = flags.FLAGS["config"].config_filename
  path, _, arg = config_arg.partition(":")
  presets = [p for p in arg.split(",")[1:] if p.strip()]
  return (f" Fallback: python -m vqvae2_jax.main --config={path}:"
          f"{','.join([stage] + presets)} --workdir={workdir}")


def main(argv):
  """absl entry: runs the stage named by --config on --workdir."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<experiment>.py:<stage>[,preset] is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  # Keys set with --config.<key>=...: only these may contradict a recorded model (and fail).
  explicit = config_flags.get_override_values(flags.FLAGS["config"])
  # Training loops replace this handler with one that saves at the next safe point.
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  try:
    run_stage(_CONFIG.value, _WORKDIR.value, explicit=tuple(explicit))
  except ckpt_lib.Preempted:
    sys.exit(0)  # a loop printed "preempted: saved step N"; the rerun resumes
  except KNOWN_ERRORS as e:
    if _show_tracebacks():
      raise
    fallback, cause = "", e
    while cause is not None:  # callers may wrap it (e.g. naming the stage)
      if isinstance(cause, ckpt_lib.CorruptCheckpointError):
        fallback = _fallback_command(cause, _WORKDIR.value)
        break
      cause = cause.__cause__
    _fail(f"{e}{fallback}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
