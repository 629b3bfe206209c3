"""bfloat16 compute on CPU: finite training, float32 params / optimizer state / logits, and
quantizer codes that do not depend on the compute dtype."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqvae2_jax import runner
from vqvae2_jax.models import quantizer as q
from vqvae2_jax.models import vqvae as vqvae_lib
from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.train import state as state_lib
from vqvae2_jax.train import step as step_lib

from helpers import load_config


def float_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def train(loss_fn, variables, batch, finalize=None, steps=3):
  tx = optax.adam(1e-3)
  params = variables["params"]
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      model_state={k: v for k, v in variables.items() if k != "params"}, ema_params={},
      rng=jax.random.PRNGKey(0))
  step = jax.jit(step_lib.make_train_step(loss_fn, tx, 0.0, 2, finalize))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)), losses
  for leaf in float_leaves((state.params, state.opt_state, state.model_state)):
    assert leaf.dtype == jnp.float32, leaf.dtype
  return state


def test_bf16_vqvae_step_keeps_float32_state():
  model = vqvae_lib.VQVAE2(hidden=16, res_hidden=8, num_res_layers=1, num_codes=16,
                           code_dim=8, upsample="subpixel", dtype=jnp.bfloat16, remat="block")
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)

  def loss_fn(params, model_state, batch, rng):
    out, updates = model.apply({"params": params, **model_state}, batch["image"], train=True,
                               mutable=["vq_batch"], rngs={"reseed": rng})
    assert out.reconstruction.dtype == jnp.float32
    loss = jnp.mean((out.reconstruction - batch["image"])**2) + 0.25 * out.commitment_loss
    return loss, ({}, {**model_state, **updates})
  train(loss_fn, variables, {"image": x}, vqvae_lib.finalize_codebooks(model))


def test_bf16_prior_step_has_float32_logits_and_log_softmax():
  prior = PixelSNAILPrior(num_codes=16, hidden=16, res_hidden=16, num_layers=2,
                          attention_every=1, num_heads=2, kernel_size=3, num_output_layers=1,
                          num_classes=3, dtype=jnp.bfloat16)
  rng = np.random.default_rng(1)
  batch = {"codes": jnp.asarray(rng.integers(0, 16, (4, 8, 8)), jnp.int32),
           "label": jnp.asarray(rng.integers(0, 3, (4,)), jnp.int32)}
  variables = prior.init(jax.random.PRNGKey(0), batch["codes"], (), batch["label"], train=False)

  def loss_fn(params, model_state, batch, rng):
    logits = prior.apply({"params": params}, batch["codes"], (), batch["label"], train=True,
                         rngs={"dropout": rng})
    log_probs = jax.nn.log_softmax(logits)
    assert logits.dtype == jnp.float32 and log_probs.dtype == jnp.float32
    loss = -jnp.mean(jnp.take_along_axis(log_probs, batch["codes"][..., None], -1))
    return loss, ({}, model_state)
  train(loss_fn, variables, batch)


def test_codes_of_bf16_encoder_outputs_equal_float32_distances():
  """Encoder outputs offset from zero (|z| ~ 4, spread 0.1: where rounding bites): the
  quantizer's codes for bf16 inputs equal float64 brute force on the same values."""
  rng = np.random.default_rng(2)
  k, d = 512, 64
  centre = 0.5 * rng.normal(size=d)  # norm ~ 0.5 * sqrt(64) = 4
  codebook = (centre + 0.1 * rng.normal(size=(k, d))).astype(np.float32)
  z = jnp.asarray(centre + 0.1 * rng.normal(size=(2, 8, 8, d)), jnp.bfloat16)
  flat = np.asarray(z, np.float64).reshape(-1, d)
  want = np.argmin(((flat[:, None] - codebook.astype(np.float64)[None])**2).sum(-1), -1)
  got = q.nearest_codes(z, jnp.asarray(codebook))
  np.testing.assert_array_equal(np.asarray(got).reshape(-1), want)
  # The batch is sensitive: distances computed in bfloat16 pick other codes.
  zb, cb = z.reshape(-1, d), jnp.asarray(codebook, jnp.bfloat16)
  bf16_codes = jnp.argmin(jnp.sum(zb**2, -1, keepdims=True) - 2 * zb @ cb.T
                          + jnp.sum(cb**2, -1), -1)
  assert np.mean(np.asarray(bf16_codes) != want) > 0.05


def test_bf16_preset_trains_stage_one(tmp_path):
  config = load_config("demo", "vqvae,tiny,bf16", **{"vqvae_train.eval_every": 0,
                                                      "vqvae_train.image_every": 0})
  assert config.vqvae_train.dtype == "bfloat16"
  runner.run_stage(config, str(tmp_path))
  rows = [json.loads(line) for path in glob.glob(os.path.join(tmp_path, "**", "metrics.jsonl"),
                                                 recursive=True) for line in open(path)]
  losses = [r["loss"] for r in rows if "loss" in r and r.get("split", "train") == "train"]
  assert losses and np.all(np.isfinite(losses))
