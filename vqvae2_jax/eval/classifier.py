"""A compact ResNet classifier trained on the project's own labelled data.

Serves classifier-based rejection sampling on data without an ImageNet
classifier (the demo sets) and the Classification Accuracy Score (train on
samples, test on real). GroupNorm instead of BatchNorm keeps it stateless:
one params collection, identical train/eval behaviour apart from dropout,
and nothing to synchronise across data-parallel replicas.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import images as image_lib
from vqvae2_jax.eval import layers


class ResidualBlock(nn.Module):
  """Pre-activation residual block: (GN, ReLU, conv3x3) x 2 plus a skip."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """float32 [B, H, W, C] -> float32 [B, H/stride, W/stride, features]."""
    h = nn.relu(layers.group_norm(x.shape[-1], name="norm1")(x))
    skip = x
    if self.stride != 1 or x.shape[-1] != self.features:
      skip = layers.conv(self.features, 1, stride=self.stride, name="proj")(h)
    h = layers.conv(self.features, 3, stride=self.stride, padding=1, name="conv1")(h)
    h = nn.relu(layers.group_norm(self.features, name="norm2")(h))
    h = layers.conv(self.features, 3, padding=1, name="conv2")(h)
    return skip + h


class ResNetClassifier(nn.Module):
  """Small ResNet: stem conv, stages of residual blocks, pooled linear head.

  Attributes:
    num_classes: number of labels.
    width: channels of the first stage; each later stage doubles them.
    stage_sizes: residual blocks per stage; every stage after the first
      halves the resolution.
    dropout_rate: dropout before the linear head (active when train=True).
    input_pool: average-pools the images by this factor before the stem (1 = off): a
      2x pooled 64x64 input costs a quarter of the FLOPs, plenty to tell photos apart.
  """
  num_classes: int
  width: int = 32
  stage_sizes: Sequence[int] = (1, 1, 1)
  dropout_rate: float = 0.0
  input_pool: int = 1

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Classifies images.

    Args:
      images: uint8 [B, H, W, 3] (mapped to [-1, 1]) or float [B, H, W, 3]
        already in [-1, 1].
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      float32 logits [B, num_classes].
    """
    if images.dtype == jnp.uint8:
      x = image_lib.to_model(images)
    else:
      x = images.astype(jnp.float32)
    if self.input_pool > 1:
      x = nn.avg_pool(x, (self.input_pool,) * 2, strides=(self.input_pool,) * 2)
    x = layers.conv(self.width, 3, padding=1, name="stem")(x)
    for s, n_blocks in enumerate(self.stage_sizes):
      for b in range(n_blocks):
        stride = 2 if (s > 0 and b == 0) else 1
        x = ResidualBlock(self.width * 2**s, stride, name=f"stage{s}_block{b}")(x)
    x = nn.relu(layers.group_norm(x.shape[-1], name="norm_out")(x))
    x = layers.global_avg_pool(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return layers.dense(self.num_classes, name="head")(x)



def classifier_init_fn(model: ResNetClassifier, image_size: int):
  """rng -> the classifier's variables for [1, S, S, 3] images."""
  def init(rng):
    return model.init({"params": rng}, jnp.zeros((1, image_size, image_size, 3)),
                      train=False)
  return init
