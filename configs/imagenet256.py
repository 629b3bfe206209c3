r"""ImageNet 256x256, the paper's main experiment (Table 5 stage 1, Table 3 priors).

Two levels: 64x64 bottom and 32x32 top latents, K=512 codes of D=64. Data: the tfds
`imagenet2012` dataset prepared from the manual download (see README, "ImageNet-256").

  python -m vqvae2_jax.main --config=configs/imagenet256.py:vqvae --workdir=/shared/runs/in256
  python -m vqvae2_jax.main --config=configs/imagenet256.py:prior_top --workdir=...
"""
from vqvae2_jax import config_lib


def make():
  c = config_lib.base_config()
  c.data.update(dict(source="tfds", tfds_name="imagenet2012", train_split="train",
                     val_split="validation", image_size=256))
  c.vqvae.update(dict(num_levels=2, hidden=128, res_hidden=64, num_res_layers=2,
                      num_codes=512, code_dim=64, beta=0.25, decay=0.99,
                      upsample="transpose"))
  c.vqvae_train = config_lib.train_config(batch_size=128, steps=2_207_444,
                                          learning_rate=3e-4, log_every=100,
                                          eval_every=5000, image_every=5000,
                                          checkpoint_every=5000, dtype="bfloat16")
  # Table 3. "Output stack layers" = 1x1 residual layers on top of the gated stack;
  # "conditioning stack residual blocks" = depth of the conditioning stack.
  c.priors.top = config_lib.prior_config(
      hidden=512, res_hidden=2048, num_layers=20, attention_every=5, num_heads=8,
      kernel_size=5, dropout=0.1, attn_dropout=0.1, num_output_layers=20,
      train=config_lib.train_config(batch_size=1024, steps=1_600_000, learning_rate=3e-4,
                                    log_every=100, eval_every=5000, image_every=0,
                                    checkpoint_every=5000, param_ema_decay=0.9999,
                                    dtype="bfloat16"))
  c.priors.bottom = config_lib.prior_config(
      hidden=512, res_hidden=1024, num_layers=20, attention_every=0, num_heads=8,
      kernel_size=5, dropout=0.1, attn_dropout=0.0, num_output_layers=0,
      num_cond_layers=20,
      train=config_lib.train_config(batch_size=512, steps=754_000, learning_rate=3e-4,
                                    log_every=100, eval_every=5000, image_every=0,
                                    checkpoint_every=5000, param_ema_decay=0.9999,
                                    dtype="bfloat16"))
  c.extract.batch_size = 256
  c.sample.update(dict(num_images=64, batch_size=64))
  c.sample.rejection.classifier = "efficientnet_lite0"
  c.evaluate.num_images = 50_000
  c.evaluate.batch_size = 250
  return c


def get_config(arg=None):
  return config_lib.build("imagenet256", arg, make, config_lib.PRESETS)
