"""vqvae2_jax: hierarchical VQ-VAE (VQ-VAE-2) with autoregressive priors in JAX/Flax."""

__version__ = "0.1.0"
