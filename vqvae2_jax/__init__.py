"""vqvae2_jax: hierarchical VQ-VAE (VQ-VAE-2) with autoregressive priors in JAX/Flax.

`vqvae2_jax.load(workdir)` returns a trained run (see `vqvae2_jax.api`).
"""

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name):
  # Lazy, so importing a submodule (e.g. vqvae2_jax.models) does not import the whole API.
  if name == "load":
    from vqvae2_jax.api import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f"module 'vqvae2_jax' has no attribute {name!r}")
