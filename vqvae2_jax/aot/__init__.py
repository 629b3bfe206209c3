"""Ahead-of-time compilation for TPU slices on any host (`python -m vqvae2_jax.compile`)."""
