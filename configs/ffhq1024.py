r"""FFHQ 1024x1024 (Table 5 stage 1, Table 4 priors), three levels: 128, 64, 32.

Data: a flat folder of the FFHQ images (`--config.data.root=/path/to/ffhq`), unlabelled,
so every prior is unconditional; the last `data.flat_val_count` files are held out.
"""
from vqvae2_jax import config_lib


def _prior_train(batch_size, steps):
  return config_lib.train_config(batch_size=batch_size, steps=steps, learning_rate=3e-4,
                                 log_every=100, eval_every=5000, image_every=0,
                                 checkpoint_every=5000, param_ema_decay=0.9999,
                                 dtype="bfloat16")


def make():
  c = config_lib.base_config()
  c.data.update(dict(source="folder", layout="flat", root="", image_size=1024,
                     flat_val_count=1000))
  # 1024 / 128 = 8: the bottom encoder downsamples x8 to give the paper's 128x128 map.
  c.vqvae.update(dict(num_levels=3, bottom_down=3, hidden=128, res_hidden=64, num_res_layers=2,
                      num_codes=512, code_dim=64, beta=0.25, decay=0.99,
                      upsample="transpose"))
  c.vqvae_train = config_lib.train_config(batch_size=128, steps=304_741,
                                          learning_rate=3e-4, log_every=100,
                                          eval_every=5000, image_every=5000,
                                          checkpoint_every=5000, dtype="bfloat16")
  c.priors.top = config_lib.prior_config(
      hidden=512, res_hidden=2048, num_layers=20, attention_every=5, num_heads=8,
      kernel_size=5, dropout=0.5, attn_dropout=0.5, num_output_layers=0,
      class_conditional=False, train=_prior_train(1024, 237_000))
  # One attention layer in 20 gated layers: after the 20th.
  c.priors.mid = config_lib.prior_config(
      hidden=512, res_hidden=1024, num_layers=20, attention_every=20, num_heads=8,
      kernel_size=5, dropout=0.3, attn_dropout=0.3, num_output_layers=0,
      num_cond_layers=8, class_conditional=False, train=_prior_train(512, 57_400))
  c.priors.bottom = config_lib.prior_config(
      hidden=512, res_hidden=1024, num_layers=10, attention_every=0, num_heads=8,
      kernel_size=5, dropout=0.25, attn_dropout=0.0, num_output_layers=0,
      num_cond_layers=8, class_conditional=False, train=_prior_train(256, 270_000))
  c.extract.batch_size = 32
  c.sample.update(dict(num_images=16, batch_size=16))
  c.evaluate.num_images = 50_000
  c.evaluate.batch_size = 100
  return c


def get_config(arg=None):
  return config_lib.build("ffhq1024", arg, make, config_lib.PRESETS)
