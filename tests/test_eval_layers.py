"""The CPU depthwise convolution equals XLA's grouped convolution."""
import numpy as np
import pytest

from vqvae2_jax.eval import layers


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (5, 2, 9), (3, 2, 8), (5, 1, 6)])
def test_depthwise_shifted_equals_native(kernel, stride, size):
  x = np.random.RandomState(0).normal(size=(2, size, size + 1, 4)).astype(np.float32)
  w = np.random.RandomState(1).normal(size=(kernel, kernel, 1, 4)).astype(np.float32)
  variables = {"params": {"kernel": w}}
  native = layers.DepthwiseConv(kernel, stride, impl="native").apply(variables, x)
  shifted = layers.DepthwiseConv(kernel, stride, impl="shifted").apply(variables, x)
  # TF 'SAME': ceil(size / stride) outputs per axis.
  assert shifted.shape == (2, -(-size // stride), -(-(size + 1) // stride), 4)
  np.testing.assert_allclose(np.asarray(shifted), np.asarray(native), rtol=1e-5, atol=1e-5)
