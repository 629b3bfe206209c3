"""VGG-16 up to fc2 (4096-d), the feature network of improved precision/recall.

Matches torch-fidelity's `vgg16` feature extractor (its default for the `prc`
metric), which wraps torchvision's `vgg16` with the classifier cut after the
second fully connected layer. Submodule names mirror torchvision's state-dict
keys: `features_<i>` for `features.<i>` (conv indices 0, 2, 5, ...) and
`classifier_0`, `classifier_3` for the two fully connected layers.

Input convention (torch-fidelity): uint8 images (or floats holding [0, 255]
values) of any size, cast to float32, resized to 224x224 with TensorFlow 1.x
bilinear resizing, normalised by ImageNet mean/std scaled to [0, 255]
(mean 255*(0.485, 0.456, 0.406), std 255*(0.229, 0.224, 0.225)).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vqvae2_jax.eval import layers
from vqvae2_jax.eval import preprocess

INPUT_SIZE = 224
FEATURE_DIM = 4096
MEAN = (255 * 0.485, 255 * 0.456, 255 * 0.406)
STD = (255 * 0.229, 255 * 0.224, 255 * 0.225)

# torchvision's configuration "D": channels per conv, "M" for a 2x2 max pool.
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
        512, 512, 512, "M")


class VGG16Features(nn.Module):
  """VGG-16 conv stack + fc1 + fc2 (inference; dropout is the identity)."""
  resize_input: bool = True

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Computes precision/recall features.

    Args:
      images: uint8 [B, H, W, 3] (or float32 holding [0, 255] values).

    Returns:
      dict with 'fc2': float32 [B, 4096] (before the ReLU) and 'fc2_relu':
      float32 [B, 4096] (after it; torch-fidelity's default for `prc`).
    """
    x = preprocess.as_float_pixels(images)
    if self.resize_input:
      x = preprocess.resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
    x = (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)
    idx = 0
    for v in _CFG:
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        idx += 1
      else:
        x = layers.conv(v, 3, padding=1, use_bias=True, name=f"features_{idx}")(x)
        x = nn.relu(x)
        idx += 2
    if x.shape[1:3] != (7, 7):
      # torchvision's AdaptiveAvgPool2d((7, 7)) is the identity only at 7x7.
      raise ValueError(
          f"VGG16Features expects 224x224 inputs (7x7 before the classifier), got "
          f"{x.shape[1] * 32}x{x.shape[2] * 32}; keep resize_input=True")
    x = x.reshape(x.shape[0], -1)  # NHWC flatten; convert.py permutes fc1.
    x = nn.relu(layers.dense(4096, name="classifier_0")(x))
    fc2 = layers.dense(4096, name="classifier_3")(x)
    return {"fc2": fc2, "fc2_relu": nn.relu(fc2)}
