r"""Command-line entry for every stage.

  python -m vqvae2_jax.main --config=configs/<experiment>.py:<stage>[,<preset>...] \
      --workdir=<dir> [--config.<key>=<value> ...]

Stages: vqvae, extract, prior_top | prior_mid | prior_bottom, classifier, sample,
evaluate, and pipeline (all of them in order). Each reads what earlier stages wrote under
the same workdir.
"""
from __future__ import annotations

import logging as py_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vqvae2_jax.runner import run_stage

__all__ = ["run_stage"]

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<experiment>.py:<stage>[,<preset>...]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this experiment's stages.")


class _QuietLibraryInfo(py_logging.Filter):
  """Drops INFO records of orbax (several per checkpoint save) so progress lines stay
  readable; warnings and errors pass, and `--verbosity=1` shows everything."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING or logging.get_verbosity() >= 1
            or "/orbax/" not in record.pathname)


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
  run_stage(_CONFIG.value, _WORKDIR.value, explicit=tuple(explicit))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
