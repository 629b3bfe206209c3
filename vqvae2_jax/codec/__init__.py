"""A neural image codec: the stage-1 codes of an image, range-coded under the priors.

  streams = run.compress(images)          # one bytes stream per image (vqvae2_jax.load)
  images = run.decompress(streams)        # == run.reconstruct(images), bit for bit
  bits = run.log_prob(images)["bits"]     # the code length of the latents, in bits

`coder` runs the coder inside the sampler's loop over the prior's decoding step, `frequencies` is the one
logits -> integer frequencies rule, `stream` the byte format, `likelihood` the
teacher-forced code length. `python -m vqvae2_jax.codec` is the command line.
"""
from vqvae2_jax.codec.coder import CodecModels, compress_codes, decompress_codes
from vqvae2_jax.codec.likelihood import code_length, make_level_bits_fn
from vqvae2_jax.codec.stream import (Header, ModelMismatchError, StreamError, fingerprint,
                                     unpack)

__all__ = ["CodecModels", "compress_codes", "decompress_codes", "code_length",
           "make_level_bits_fn", "Header", "ModelMismatchError", "StreamError",
           "fingerprint", "unpack"]
