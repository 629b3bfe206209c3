"""The N-level hierarchical VQ-VAE of VQ-VAE-2 (paper section 3.1, Algorithm 1).

Levels are ordered top first: level 0 is the smallest map (32x32 for ImageNet-256), level
N-1 the largest ("bottom", 64x64). The bottom encoder downsamples the pixels by 4 (ImageNet-256:
64x64 bottom map; `bottom_down=3` gives the x8 FFHQ-1024 needs for its 128x128 bottom map)
and each further level by 2 more, so level l has stride 2**bottom_down * 2**(N-1-l).

Encoding (Algorithm 1, generalised to N levels):
  f_{N-1} = E_{N-1}(x)                      pixel features at the bottom stride
  f_l     = E_l(f_{l+1})                    pixel features, 2x smaller per level
  q_0     = Quantize(conv1x1(f_0))
  q_l     = Quantize(conv1x1([f_l, U_l(q_{l-1})]))   for l = 1..N-1
where U_l decodes the quantized level above up to level l's resolution, so each lower
level sees the pixels and the level above and encodes what the level above lacks.
Decoding: every level's quantized map is brought to the bottom resolution by its own
x2 upsamplers, all are concatenated, and one feed-forward decoder maps them to pixels.

Images are float in [-1, 1] (see `vqvae2_jax.images.to_model`).

Training updates the EMA codebooks either inside the call (`mutable=['vq_stats']`) or,
for gradient accumulation, deferred: `mutable=['vq_batch']` records each microbatch's
sums and `finalize_codebooks` applies one EMA step with the whole batch's
(models/quantizer.py).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from vqvae2_jax.models.layers import Decoder, Encoder, Upsample2x, conv
# level_names is re-exported: the model's level naming, importable beside the model.
from vqvae2_jax.models.names import (  # pylint: disable=unused-import
    REMAT_NONE, UPSAMPLE_TRANSPOSE, level_names)
from vqvae2_jax.models.remat import check_mode as check_remat
from vqvae2_jax.models.quantizer import (VQ_BATCH_COLLECTION, VQ_COLLECTION, CodebookOptions,
                                         VectorQuantizerEMA)


def level_strides(num_levels: int, bottom_down: int = 2) -> tuple[int, ...]:
  """Downsampling factor of each level, top first: (8, 4) for 2 levels.

  bottom_down: number of x2 downsamplings of the bottom encoder (2 -> stride 4 as for
  ImageNet-256's 64x64 bottom map; 3 -> stride 8 for FFHQ-1024's 128x128 bottom map).
  """
  return tuple(2**bottom_down * 2**(num_levels - 1 - l) for l in range(num_levels))


class VQVAEOutput(NamedTuple):
  """Result of a VQ-VAE forward pass.

  reconstruction: float32 [B, H, W, 3] in the image scale ([-1, 1]).
  codes: tuple of int32 [B, H_l, W_l], top first.
  commitment_loss: float32 scalar, sum over levels of each level's mean commitment.
  perplexity: float32 [N], per level. usage: float32 [N], fraction of codes used.
  """
  reconstruction: jax.Array
  codes: tuple[jax.Array, ...]
  commitment_loss: jax.Array
  perplexity: jax.Array
  usage: jax.Array


class VQVAE2(nn.Module):
  """Hierarchical VQ-VAE with EMA codebooks (Table 5 defaults).

  Attributes:
    num_levels: N latent maps (2 for ImageNet-256, 3 for FFHQ-1024).
    bottom_down: x2 downsamplings from pixels to the bottom map (2 = stride 4).
    hidden: "hidden units" of encoders and decoders.
    res_hidden: "residual units", width inside each residual block.
    num_res_layers: residual blocks per stack ("layers").
    num_codes: K per level. code_dim: D per level.
    decay / epsilon / dead_code_threshold: quantizer EMA settings.
    codebook_options: the quantizers' options beyond the paper (defaults: the paper's;
      see models/quantizer.py).
    upsample: 'transpose' (paper) | 'subpixel' | 'resize'.
    dtype: compute dtype of the convolutions (params and quantizer stay float32).
    remat: 'none' | 'block': recompute each residual block in the backward pass
      (models/remat.py); a memory lever only, parameters and values are unchanged.
  """
  num_levels: int = 2
  bottom_down: int = 2
  hidden: int = 128
  res_hidden: int = 64
  num_res_layers: int = 2
  num_codes: int = 512
  code_dim: int = 64
  decay: float = 0.99
  epsilon: float = 1e-5
  dead_code_threshold: float = 0.0
  codebook_options: CodebookOptions = CodebookOptions()
  upsample: str = UPSAMPLE_TRANSPOSE
  dtype: Any = jnp.float32
  remat: str = REMAT_NONE

  def setup(self):
    n, kw = self.num_levels, dict(dtype=self.dtype)
    check_remat(self.remat)
    stack_kw = dict(kw, remat=self.remat)
    # encoders[l] computes level l's pixel features; the bottom one sees the pixels.
    self.encoders = [self.make_encoder(l, stack_kw) for l in range(n)]
    self.pre_quant = [conv(self.code_dim, 1, **kw) for _ in range(n)]
    self.quantizers = [
        VectorQuantizerEMA(self.num_codes, self.code_dim, self.decay, self.epsilon,
                           self.dead_code_threshold, options=self.codebook_options)
        for _ in range(n)]
    # cond_decoders[l-1] brings q_{l-1} up to level l for level l's encoder.
    self.cond_decoders = [
        Decoder(self.code_dim, self.hidden, self.res_hidden, self.num_res_layers, num_up=1,
                upsample=self.upsample, **stack_kw) for _ in range(n - 1)]
    # to_bottom[l] upsamples q_l (l < N-1) to the bottom resolution for the decoder.
    self.to_bottom = [
        [Upsample2x(self.code_dim, self.upsample, **kw) for _ in range(n - 1 - l)]
        for l in range(n - 1)]
    self.decoder = Decoder(3, self.hidden, self.res_hidden, self.num_res_layers,
                           num_up=self.bottom_down,
                           upsample=self.upsample, **stack_kw)

  def make_encoder(self, level: int, stack_kw: dict) -> nn.Module:
    """Level `level`'s encoder (variants of the architecture override this)."""
    n = self.num_levels
    return Encoder(self.hidden, self.res_hidden, self.num_res_layers,
                   num_down=self.bottom_down if level == n - 1 else 1, **stack_kw)

  def _check_image(self, x: jax.Array):
    stride = level_strides(self.num_levels, self.bottom_down)[0]
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % stride or x.shape[2] % stride:
      raise ValueError(f"images must be [B, H, W, 3] with H and W divisible by {stride} "
                       f"for {self.num_levels} levels; got {x.shape}")

  def _encode(self, x: jax.Array, train: bool):
    """Returns (quantized maps, quantizer outputs), top first."""
    self._check_image(x)
    n = self.num_levels
    features = [None] * n
    features[n - 1] = self.encoders[n - 1](x.astype(self.dtype))
    for l in range(n - 2, -1, -1):
      features[l] = self.encoders[l](features[l + 1])
    quantized, outputs = [], []
    for l in range(n):
      h = features[l]
      if l > 0:
        h = jnp.concatenate([h, self.cond_decoders[l - 1](quantized[-1]).astype(h.dtype)], -1)
      out = self.quantizers[l](self.pre_quant[l](h), train=train)
      quantized.append(out.quantized)
      outputs.append(out)
    return quantized, outputs

  def decode(self, quantized: Sequence[jax.Array], level_mask: Sequence[bool] | None = None
             ) -> jax.Array:
    """Decodes quantized maps (float [B, H_l, W_l, D], top first) to float32 images.

    level_mask: which levels to use; excluded levels are replaced by zeros (the paper's
    Figure 3 reconstructions from a subset of levels). Default: all levels.
    """
    n = self.num_levels
    if len(quantized) != n:
      raise ValueError(f"expected {n} quantized maps (top first), got {len(quantized)}")
    mask = tuple(level_mask) if level_mask is not None else (True,) * n
    maps = []
    for l, q in enumerate(quantized):
      q = q.astype(self.dtype) * (1.0 if mask[l] else 0.0)
      for up in (self.to_bottom[l] if l < n - 1 else ()):
        q = up(q)
      maps.append(q)
    return self.decoder(jnp.concatenate(maps, axis=-1)).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool) -> VQVAEOutput:
    """Encodes, quantizes (updating codebooks when `train`) and decodes x [B, H, W, 3]."""
    quantized, outputs = self._encode(x, train)
    return VQVAEOutput(
        reconstruction=self.decode(quantized),
        codes=tuple(o.codes for o in outputs),
        commitment_loss=sum(o.commitment_loss for o in outputs),
        perplexity=jnp.stack([o.perplexity for o in outputs]),
        usage=jnp.stack([o.usage for o in outputs]))

  def encode(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Images float [B, H, W, 3] -> int32 codes per level [B, H_l, W_l], top first."""
    _, outputs = self._encode(x, train=False)
    return tuple(o.codes for o in outputs)

  def decode_codes(self, codes: Sequence[jax.Array],
                   level_mask: Sequence[bool] | None = None) -> jax.Array:
    """Integer codes per level (top first) -> float32 images [B, H, W, 3]."""
    quantized = [self.quantizers[l].lookup(c) for l, c in enumerate(codes)]
    return self.decode(quantized, level_mask)

  def reconstruct(self, x: jax.Array, level_mask: Sequence[bool] | None = None) -> jax.Array:
    """Encode then decode x [B, H, W, 3] (optionally from a subset of levels)."""
    quantized, _ = self._encode(x, train=False)
    return self.decode(quantized, level_mask)

  def commit_codebooks(self, batch_stats) -> None:
    """One EMA step per level from deferred statistics (apply with mutable=['vq_stats']).

    batch_stats: the 'vq_batch' collection of A microbatches, each leaf stacked on a
    leading [A] axis ({'quantizers_<l>': {'count': [A, K], 'sum': [A, K, D], ...}}).
    """
    for quantizer in self.quantizers:
      quantizer.commit_batch_statistics(batch_stats[quantizer.name])


def finalize_codebooks(model: VQVAE2):
  """The train step's `finalize_state` for a loss that applies `model` with
  mutable=['vq_batch']: (params, model_state, microbatch_states, rng) -> model_state.

  microbatch_states hold each microbatch's 'vq_batch' stacked on a leading axis; their sums
  are the whole batch's, so the EMA step equals the one of an unaccumulated step.
  """
  def finalize(params, model_state, microbatch_states, rng):
    variables = {"params": params, VQ_COLLECTION: model_state[VQ_COLLECTION]}
    _, updates = model.apply(variables, microbatch_states[VQ_BATCH_COLLECTION],
                             method=VQVAE2.commit_codebooks, mutable=[VQ_COLLECTION],
                             rngs={"reseed": rng})
    return {k: v for k, v in {**model_state, **updates}.items() if k != VQ_BATCH_COLLECTION}
  return finalize
