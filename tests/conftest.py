"""Test setup: CPU only, 8 fake host devices so sharding tests have a mesh."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny programs: XLA's backend optimisation costs far more compile time than it
# saves at run time, so it is off.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests compile the same tiny programs (init, train step, encode): a persistent
# compilation cache shared by the whole run compiles each of them once.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("VQVAE2_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "vqvae2_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
