"""Test setup: CPU only, 8 fake host devices so sharding tests have a mesh."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny programs: XLA's backend optimisation costs far more compile time than it
# saves at run time, so it is off.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import tempfile  # noqa: E402

# Many tests compile the same tiny programs (init, train step, encode): a persistent
# compilation cache shared by the whole run (subprocesses included, through the
# environment) compiles each of them once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "vqvae2_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from vqvae2_jax import registry  # noqa: E402  (plain Python: no jax imported yet)

# Every stage of the two-level demo pipeline up to `sample`.
TINY_PIPELINE_STAGES = (registry.VQVAE, registry.EXTRACT,
                        *map(registry.prior_stage, registry.level_names(2)),
                        registry.CLASSIFIER, registry.SAMPLE)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
  """A workdir where every `demo:<stage>,tiny` stage up to `sample` has run once."""
  from vqvae2_jax import main  # pylint: disable=g-import-not-at-top
  from helpers import load_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("tiny_pipeline"))
  for stage in TINY_PIPELINE_STAGES:
    main.run_stage(load_config("demo", f"{stage},tiny"), workdir)
  return workdir
