"""Causality of the building blocks in vqvae2_jax.models.causal (Jacobian checks)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.models import causal

H, W, CIN, COUT = 6, 7, 2, 3


def numpy_init(module, *args, seed=0, **kwargs):
  """Random variables for `module` from numpy (fast on CPU: no PRNG kernels to compile).

  Every entry, biases included, is nonzero so that all taps show in a Jacobian.
  """
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.key(0), *args, **kwargs)))
  rng = np.random.default_rng(seed)

  def fill(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree.map(fill, shapes)


def _dependency(fn, x):
  """Boolean [H, W, H, W]: does output position (i, j) depend on input position (a, b)?"""
  jac = jax.jit(jax.jacrev(fn))(x)  # [1, H, W, Cout, 1, H, W, Cin]
  return np.asarray(jnp.any(jac[0, :, :, :, 0] != 0, axis=(2, 5)))


def _expected(mode, kernel, shift):
  kh, kw = kernel
  dep = np.zeros((H, W, H, W), bool)
  for i in range(H):
    for j in range(W):
      oi, oj = i, j
      if shift == "down":
        oi = i - 1
      if shift == "right":
        oj = j - 1
      if oi < 0 or oj < 0:
        continue
      cols = (range(oj - kw // 2, oj + kw // 2 + 1) if mode == "down"
              else range(oj - kw + 1, oj + 1))
      for a in range(oi - kh + 1, oi + 1):
        for b in cols:
          if 0 <= a < H and 0 <= b < W:
            dep[i, j, a, b] = True
  return dep


@pytest.mark.parametrize("mode,kernel,shift", [
    ("down", (3, 5), None), ("down", (2, 5), "down"), ("down", (1, 3), "down"),
    ("down_right", (3, 3), None), ("down_right", (1, 2), "right"),
    ("down_right", (2, 2), "right")])
def test_conv_receptive_field_is_exactly_causal(mode, kernel, shift):
  conv = causal.CausalConv(COUT, kernel, mode)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, H, W, CIN)), jnp.float32)
  params = numpy_init(conv, x)
  shift_fn = {None: lambda y: y, "down": causal.down_shift, "right": causal.right_shift}[shift]
  dep = _dependency(lambda z: shift_fn(conv.apply(params, z)), x)
  np.testing.assert_array_equal(dep, _expected(mode, kernel, shift))
  # With a shift, nothing depends on its own position or any later one.
  if shift is not None:
    flat = dep.reshape(H * W, H * W)
    assert not np.any(np.triu(flat)), "shifted conv sees the current or a later position"


@pytest.mark.parametrize("mode,kernel", [("down", (3, 5)), ("down_right", (3, 3))])
def test_prepadded_windows_match_full_conv(mode, kernel):
  conv = causal.CausalConv(COUT, kernel, mode)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, H, W, CIN)), jnp.float32)
  params = numpy_init(conv, x)
  full = conv.apply(params, x)
  xp = jnp.pad(x, ((0, 0),) + causal.conv_padding(mode, kernel) + ((0, 0),))
  kh, kw = kernel
  for i in (0, 2, H - 1):
    row = conv.apply(params, xp[:, i:i + kh], True)
    np.testing.assert_allclose(row[:, 0], full[:, i], rtol=1e-5, atol=1e-5)
    for j in (0, 3, W - 1):
      one = conv.apply(params, xp[:, i:i + kh, j:j + kw], True)
      np.testing.assert_allclose(one, full[:, i, j], rtol=1e-5, atol=1e-5)


def test_conv_rejects_even_width_for_down_mode():
  with pytest.raises(ValueError, match="odd kernel width"):
    causal.conv_padding("down", (2, 4))
  with pytest.raises(ValueError, match="unknown causal conv mode"):
    causal.conv_padding("up", (2, 3))


def test_attention_is_strictly_causal_and_nan_free():
  n, cq, ckv = 10, 5, 7
  attn = causal.CausalSelfAttention(features=8, num_heads=2)
  rng = np.random.default_rng(0)
  q_in = jnp.asarray(rng.normal(size=(1, n, cq)), jnp.float32)
  kv_in = jnp.asarray(rng.normal(size=(1, n, ckv)), jnp.float32)
  params = numpy_init(attn, q_in, kv_in, train=False)
  fn = lambda q, kv: attn.apply(params, q, kv, train=False)
  out = jax.jit(fn)(q_in, kv_in)
  assert np.all(np.isfinite(np.asarray(out)))
  jq, jkv = jax.jit(jax.jacrev(fn, argnums=(0, 1)))(q_in, kv_in)  # [1, n, F, 1, n, C]
  dep_q = np.asarray(jnp.any(jq[0, :, :, 0] != 0, axis=(1, 3)))  # [n, n]
  dep_kv = np.asarray(jnp.any(jkv[0, :, :, 0] != 0, axis=(1, 3)))
  # Keys/values: exactly the strictly earlier positions.
  np.testing.assert_array_equal(dep_kv, np.tril(np.ones((n, n), bool), k=-1))
  # Queries: only their own position; positions 0 (nothing visible) and 1 (a single
  # visible key, so its weight is 1 whatever the query) depend on no query.
  expect_q = np.eye(n, dtype=bool)
  expect_q[0, 0] = expect_q[1, 1] = False
  np.testing.assert_array_equal(dep_q, expect_q)
  # Gradients through the fully masked row stay finite.
  g = jax.jit(jax.grad(lambda q, kv: jnp.sum(fn(q, kv)[:, 0] ** 2), argnums=(0, 1)))(q_in, kv_in)
  assert all(np.all(np.isfinite(np.asarray(t))) for t in g)


def test_attention_dropout_changes_weights_only_in_train():
  attn = causal.CausalSelfAttention(features=8, num_heads=2, attn_dropout=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8)), jnp.float32)
  params = numpy_init(attn, x, x, train=False)
  run = jax.jit(lambda train, key: attn.apply(params, x, x, train=train, rngs={"dropout": key}),
                static_argnums=0)
  a, b = run(False, jax.random.key(3)), run(True, jax.random.key(3))
  assert not np.allclose(a, b)
  np.testing.assert_allclose(a, run(False, jax.random.key(4)))


def test_positional_features_distinguish_positions():
  pos = np.asarray(causal.positional_features(4, 5))
  assert pos.shape == (20, 18)
  assert len({tuple(np.round(r, 6)) for r in pos}) == 20
