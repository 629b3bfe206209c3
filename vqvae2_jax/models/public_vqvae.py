"""The VQ-VAE-2 of the public PyTorch code (rosinality/vq-vae-2-pytorch), as a VQVAE2 variant.

Its two-level model (`vqvae.py`: VQVAE, Encoder, Decoder, Quantize, ResBlock) is this
package's `VQVAE2` with num_levels=2, bottom_down=2, upsample='transpose' and the l2 EMA
quantizer, except for one layer: its top encoder's strided 4x4 conv has hidden // 2
output channels (then a 3x3 conv to hidden), where VQVAE2's has hidden. Everything else
maps one to one (`vqvae2_jax.import_torch` does the mapping):

  enc_b (conv4x4/2 to C/2, conv4x4/2 to C, conv3x3, res blocks, relu)  -> encoders[1]
  enc_t (conv4x4/2 to C/2, conv3x3 to C, res blocks, relu)             -> encoders[0]
  quantize_conv_t / quantize_t                                          -> pre_quant[0] / quantizers[0]
  dec_t (conv3x3, res blocks, relu, convT4x4/2 to D)                    -> cond_decoders[0]
  quantize_conv_b on [dec_t(q_t), enc_b]                                -> pre_quant[1] on
                                                   [enc_b, dec_t(q_t)]: input channels swapped
  upsample_t (convT4x4/2)                                               -> to_bottom[0][0]
  dec on [upsample_t(q_t), q_b]                                         -> decoder
  Quantize buffers embed [D, K], cluster_size [K], embed_avg [D, K]     -> vq_stats codebook
                                                   [K, D], ema_count [K], ema_sum [K, D]

The public Quantize's update is the paper's EMA with Laplace smoothing, eps 1e-5 and
decay 0.99, exactly VectorQuantizerEMA's; its ResBlock is ResidualStack's block.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from vqvae2_jax.models.layers import Encoder, ResidualStack, conv
from vqvae2_jax.models.names import UPSAMPLE_TRANSPOSE
from vqvae2_jax.models.vqvae import VQVAE2


class HalfWidthEncoder(Encoder):
  """Encoder whose strided convs all have hidden // 2 channels but a last one of several:
  the public top encoder (one strided conv to C/2, then the 3x3 conv to C).

  x: float [B, H, W, C] -> [B, H / 2**num_down, W / 2**num_down, hidden].
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_down):
      last_of_several = i == self.num_down - 1 and self.num_down > 1
      width = self.hidden if last_of_several else self.hidden // 2
      x = nn.relu(conv(width, 4, stride=2, dtype=self.dtype)(x))
    x = conv(self.hidden, 3, dtype=self.dtype)(x)
    return ResidualStack(self.res_hidden, self.num_res_layers, self.dtype, self.remat)(x)


class PublicVQVAE(VQVAE2):
  """VQVAE2 with the public code's encoders (see the module docstring); two levels,
  bottom stride 4, transposed-conv upsampling and the paper's quantizer only."""

  def setup(self):
    wanted = dict(num_levels=2, bottom_down=2, upsample=UPSAMPLE_TRANSPOSE, lookup_dim=0)
    have = dict(num_levels=self.num_levels, bottom_down=self.bottom_down,
                upsample=self.upsample, lookup_dim=self.codebook_options.lookup_dim)
    wrong = {k: have[k] for k, v in wanted.items() if have[k] != v}
    if wrong:
      raise ValueError(f"the public VQ-VAE-2 architecture has {wanted}; got {wrong}")
    super().setup()

  def make_encoder(self, level: int, stack_kw: dict) -> nn.Module:
    return HalfWidthEncoder(self.hidden, self.res_hidden, self.num_res_layers,
                            num_down=self.bottom_down if level == self.num_levels - 1 else 1,
                            **stack_kw)
