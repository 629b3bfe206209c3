"""The prior's decoding step, position by position, equals its teacher-forced pass."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.models.prior import PixelSNAILPrior

from helpers import numpy_params

K = 8
CASES = {
    # Two attention blocks (one after each layer), output stack: unconditional.
    "unconditional_attn": dict(num_codes=K, hidden=16, res_hidden=16, num_layers=2,
                               attention_every=1, num_heads=2, num_output_layers=1),
    # One upper level (scale 2) and one attention block after two layers.
    "cond_codes_attn": dict(num_codes=K, hidden=16, res_hidden=16, num_layers=3,
                            attention_every=2, num_heads=2, num_cond_layers=1,
                            num_cond_levels=1, cond_scales=(2,)),
    # Class-conditional with a null label, attention, two output blocks.
    "classes_attn": dict(num_codes=K, hidden=16, res_hidden=16, num_layers=2,
                         attention_every=2, num_heads=4, num_output_layers=2,
                         num_classes=3, null_label=True, label_dropout=0.1),
    # Scanned: two segments of two gated layers + attention, then a one-layer tail.
    "segments_and_tail": dict(num_codes=K, hidden=16, res_hidden=16, num_layers=5,
                              attention_every=2, num_heads=2, num_output_layers=2,
                              num_classes=3),
    # No attention: the gated layers are all tail.
    "no_attn_cond_codes": dict(num_codes=K, hidden=16, res_hidden=16, num_layers=3,
                               num_cond_layers=2, num_cond_levels=1, cond_scales=(2,)),
}
B, H, W = 2, 8, 6  # 8 rows: two row spans of the attention cache


def _inputs(model):
  rng = np.random.default_rng(5)
  codes = jnp.asarray(rng.integers(0, K, (B, H, W)), jnp.int32)
  cond = tuple(jnp.asarray(rng.integers(0, K, (B, H // s, W // s)), jnp.int32)
               for s in model.cond_scales)
  labels = (jnp.asarray([0, model.num_classes], jnp.int32) if model.num_classes else None)
  return codes, cond, labels


def _decode_teacher_forced(model, params, codes, cond, labels):
  """Logits [B, H, W, K] of decode_step at every position, feeding the given codes."""
  view, variables = model, {"params": params}

  step = jax.jit(lambda c, p, span: view.apply(variables, c, p, span=span,
                                               method="decode_step"), static_argnums=2)
  feed = jax.jit(lambda c, p, x, span: view.apply(variables, c, p, x, span=span,
                                                  method="feed"), static_argnums=3)
  begin = jax.jit(lambda c, i: view.apply(variables, c, i, method="begin_row"))
  cache = view.apply(variables, (B, H, W), cond, labels, method="init_cache")
  out = np.zeros((B, H, W, K), np.float32)
  spans = view.decode_row_spans((B, H, W))
  assert len(spans) == (2 if model.attention_every else 1)
  assert spans[0][0] == 0 and spans[-1][1] == H
  for span, (r0, r1) in enumerate(spans):
    for i in range(r0, r1):
      cache = begin(cache, jnp.int32(i))
      for j in range(W):
        p = jnp.int32(i * W + j)
        logits, cache = step(cache, p, span)
        out[:, i, j] = np.asarray(logits)
        cache = feed(cache, p, codes[:, i, j], span)
  return out


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_decode_step_equals_teacher_forced_logits(name, scan_layers):
  model = PixelSNAILPrior(**CASES[name], scan_layers=scan_layers)
  codes, cond, labels = _inputs(model)
  params = numpy_params(model, codes, cond, labels)
  full = model.apply({"params": params}, codes, cond, labels, train=False)
  decoded = _decode_teacher_forced(model, params, codes, cond, labels)
  np.testing.assert_allclose(decoded, np.asarray(full), rtol=1e-5, atol=1e-5)
  # The logits are not all alike: the comparison has something to compare.
  assert np.std(np.asarray(full)) > 1e-3
