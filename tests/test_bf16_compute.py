"""bf16 settings that could be silently ignored: the lowered programs must really multiply
in bfloat16, and bf16 losses must track float32 ones within a tolerance that a broken
cast exceeds."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqvae2_jax import builders
from vqvae2_jax.aot import programs as programs_lib

from helpers import load_config

_OP = re.compile(r"stablehlo\.(convolution|dot_general)\b[^\n]*?:\s*\(([^)]*)\)")


def contraction_dtypes(hlo_text: str) -> dict[str, list[str]]:
  """{'convolution': [operand element types...], 'dot_general': [...]} of a StableHLO
  module, one entry per op (the lhs operand's element type)."""
  found: dict[str, list[str]] = {"convolution": [], "dot_general": []}
  for op, operands in _OP.findall(hlo_text):
    lhs = operands.split(",")[0]
    found[op].append(re.search(r"x(bf16|f16|f32|f64|[su]?i\d+)>", lhs).group(1))
  return found


def lowered_train_step(stage: str, dtype: str) -> str:
  config = load_config("demo", f"{stage},tiny", **{
      "vqvae_train.dtype": dtype, "priors.top.train.dtype": dtype})
  devices = jax.devices()[:1]
  manifest = programs_lib.manifest_from_config(config, num_classes=4)
  program = programs_lib.train_program(config, stage, devices, manifest)
  with program.context():
    return program.jitted.lower(*program.args).as_text()


# Stage 1's matmuls are all float32 on purpose (nearest-code distances, EMA statistics,
# HIGHEST precision); the prior's dense layers run in bf16.
@pytest.mark.parametrize("stage, bf16_matmul_share", [("vqvae", 0.0), ("prior_top", 0.5)])
def test_bf16_train_steps_multiply_in_bf16(stage, bf16_matmul_share):
  bf16 = contraction_dtypes(lowered_train_step(stage, "bfloat16"))
  f32 = contraction_dtypes(lowered_train_step(stage, "float32"))
  # Every convolution of the model (forward and both gradients) runs in bf16...
  assert bf16["convolution"] and set(bf16["convolution"]) == {"bf16"}, bf16
  # ...and so do the prior's dense layers (its logits head and attention scores stay
  # float32 on purpose).
  share = np.mean([t == "bf16" for t in bf16["dot_general"]])
  assert share >= bf16_matmul_share and (share > 0) == (bf16_matmul_share > 0), bf16
  # The float32 setting multiplies in float32 only: the dtype field is what decides.
  assert "bf16" not in f32["convolution"] + f32["dot_general"], f32


def _prior_loss(dtype: str, reduce_in=jnp.float32) -> float:
  """Mean NLL of the tiny top prior on fixed codes (no dropout), computed in `dtype`,
  with the mean over positions taken in `reduce_in`."""
  config = load_config("demo", "prior_top,tiny", **{"priors.top.train.dtype": dtype,
                                                    "priors.top.dropout": 0.0,
                                                    "priors.top.attn_dropout": 0.0})
  manifest = programs_lib.manifest_from_config(config, num_classes=4)
  prior = builders.build_prior(config, "top", manifest)
  params = builders.prior_init_fn(prior, manifest, "top")(jax.random.key(0))["params"]
  rng = np.random.default_rng(0)
  h, w = manifest["shapes"]["top"]
  codes = jnp.asarray(rng.integers(0, prior.num_codes, (8, h, w)), jnp.int32)
  labels = jnp.asarray(rng.integers(0, 4, (8,)), jnp.int32)
  logits = prior.apply({"params": params}, codes, (), labels, train=False)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
  return float(jnp.mean(nll.astype(reduce_in)))


def test_bf16_loss_tracks_float32_within_what_a_broken_cast_exceeds():
  f32, bf16 = _prior_loss("float32"), _prior_loss("bfloat16")
  rel = abs(bf16 - f32) / f32
  assert 0 < rel < 1e-4, (f32, bf16)  # computed in bf16 (not equal), close to float32
  # A cast in the wrong place (the loss reduced in bf16) lands outside that tolerance.
  broken = _prior_loss("bfloat16", reduce_in=jnp.bfloat16)
  assert abs(broken - f32) / f32 > 1e-4, (f32, bf16, broken)
