"""A scanned prior's sampling loop is one program whatever its depth: the decoding step
scans over the stacked layers (models/prior_decoding_scanned.py) instead of unrolling
them, so a paper-size prior's sampler compiles like a shallow one."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.sampling.incremental import decode_loop

SHAPE = (2, 8, 4)  # two row spans of the attention cache


def _greedy(p, logits):
  del p
  return jnp.argmax(logits, -1)


def _lowered_lines(scan_layers: bool, per_segment: int) -> int:
  """Lines of the lowered sampling loop of a prior with two attention segments of
  `per_segment` gated layers each and a one-layer tail."""
  model = PixelSNAILPrior(num_codes=8, hidden=16, res_hidden=16,
                          num_layers=2 * per_segment + 1, attention_every=per_segment,
                          num_heads=2, num_output_layers=2, num_classes=3,
                          scan_layers=scan_layers)
  codes = jnp.zeros(SHAPE, jnp.int32)
  labels = jnp.zeros(SHAPE[:1], jnp.int32)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), codes, (), labels, train=False))
  params = nn.meta.unbox(variables["params"])
  loop = functools.partial(decode_loop, model, shape=SHAPE, choose=_greedy, sharding=None,
                           return_logits=False)
  text = jax.jit(loop).lower(params, (), labels).as_text()
  return len(text.splitlines())


def test_scanned_sampling_loop_does_not_grow_with_depth():
  shallow, deep = _lowered_lines(True, 2), _lowered_lines(True, 6)
  # Nearly equal, not equal: the lowering shares helper functions between arrays whose
  # shapes coincide, which depends on the depth (2 layers per segment, 2 segments).
  assert abs(deep - shallow) <= 0.02 * shallow, (shallow, deep)


def test_unrolled_sampling_loop_grows_with_depth():
  # The measure sees depth: the one-module-per-layer layout repeats every layer.
  shallow, deep = _lowered_lines(False, 2), _lowered_lines(False, 6)
  assert deep > 1.5 * shallow, (shallow, deep)
