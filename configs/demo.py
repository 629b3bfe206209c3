r"""Demo: real photographs shipped by scikit-image / scikit-learn, 64x64, CPU-sized.

Two levels (16x16 bottom, 8x8 top). Labels are the source photographs, so the
class-conditional priors have real classes. Every stage finishes in minutes on 2 cores:

  python -m vqvae2_jax.main --config=configs/demo.py:pipeline --workdir=runs/demo
"""
from vqvae2_jax import config_lib


def make():
  c = config_lib.base_config()
  c.data.source = "demo"
  c.data.image_size = 64
  c.data.demo_train_size = 4096
  c.data.demo_val_size = 64
  c.vqvae.update(dict(num_levels=2, hidden=64, res_hidden=32, num_res_layers=2,
                      num_codes=128, code_dim=32, upsample="subpixel",
                      # Short runs from scratch leave many codes unused: re-seed them.
                      dead_code_threshold=1.0))
  # Schedules sized so the whole pipeline takes about five minutes on 2 idle CPU cores
  # (README, "Measured results"); every stage is compute bound there.
  c.vqvae_train = config_lib.train_config(
      batch_size=8, steps=300, learning_rate=1e-3, log_every=50, eval_every=150,
      image_every=300, checkpoint_every=300)
  prior_train = dict(batch_size=16, steps=300, learning_rate=2e-3, log_every=50,
                     eval_every=150, image_every=0, checkpoint_every=300,
                     param_ema_decay=0.0)
  # The bottom map has 4x the latents of the top: a smaller batch keeps its steps short.
  c.priors.update(config_lib.cpu_priors(
      config_lib.train_config(**prior_train),
      config_lib.train_config(**dict(prior_train, batch_size=8))))
  # A lighter conditioning stack: two 3x3 blocks of width 64 instead of three of 128.
  c.priors.bottom.update(dict(num_cond_layers=2, res_hidden=64))
  c.classifier.update(dict(width=16, depth=1, input_pool=2))
  c.classifier.train = config_lib.train_config(
      batch_size=32, steps=150, learning_rate=2e-3, log_every=50, eval_every=150,
      image_every=0, checkpoint_every=150)
  c.extract.batch_size = 64
  c.sample.update(dict(num_images=16, batch_size=16, temperature=1.0))
  c.sample.rejection.classifier = "trained"
  c.evaluate.update(dict(num_images=64, mse_max_images=512, nll_max_batches=8,
                         rate_distortion_images=32, cas_per_point=True))
  return c


def get_config(arg=None):
  return config_lib.build("demo", arg, make, config_lib.PRESETS)
