"""Stage 2b: train the prior of one level on extracted codes (paper Algorithm 2, 8-9).

`prior_top` models p(e_top | class); `prior_mid` / `prior_bottom` model
p(e_l | e_above, class) with a conditioning stack over the levels above. Loss: categorical
cross-entropy over the K codes; NLL is reported per latent in nats and bits (Table 1).
Writes <workdir>/prior_<level>/{metrics.jsonl, checkpoints/}.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from vqvae2_jax import parallel
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data.sources import spread_indices
from vqvae2_jax.stages import common
from vqvae2_jax.train import loop


def stage_name(level: str) -> str:
  """'top' -> 'prior_top', the stage and directory name."""
  return f"prior_{level}"


def prior_inputs(batch, level: str, upper: tuple[str, ...], conditional: bool):
  """(codes [B,H,W], cond_codes tuple, labels [B] or None) of a code batch."""
  return (batch[level], tuple(batch[u] for u in upper),
          batch["label"] if conditional else None)


def nll_terms(logits, codes):
  """Per-example mean NLL (nats per latent) and accuracy: float32 [B] each."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)
  correct = (jnp.argmax(logits, -1) == codes).astype(jnp.float32)
  return ce.mean(axis=(1, 2)), correct.mean(axis=(1, 2))


def make_loss_fn(prior, level, upper):
  """(params, model_state, code batch, rng) -> (mean NLL, (metrics, model_state))."""
  conditional = prior.num_classes > 0

  def loss_fn(params, model_state, batch, rng):
    codes, cond, labels = prior_inputs(batch, level, upper, conditional)
    logits = prior.apply({"params": params}, codes, cond, labels, train=True,
                         rngs={"dropout": rng})
    nll, acc = nll_terms(logits, codes)
    loss = nll.mean()
    return loss, (dict(nll_nats=loss, nll_bits=loss / math.log(2), accuracy=acc.mean()),
                  model_state)
  return loss_fn


def make_eval_fn(prior, level, upper, mesh):
  """Jitted (params, code batch) -> per-example NLL and accuracy, float32 [B] each."""
  conditional = prior.num_classes > 0

  @functools.partial(jax.jit, out_shardings=parallel.batch_sharding(mesh))
  def evaluate(params, batch):
    codes, cond, labels = prior_inputs(batch, level, upper, conditional)
    logits = prior.apply({"params": params}, codes, cond, labels, train=False)
    return nll_terms(logits, codes)
  return evaluate


def dataset_nll(eval_fn, params, codes: codes_lib.CodeShards, batch_size: int, mesh,
                max_batches: int = 0) -> dict[str, float]:
  """Mean NLL per latent (nats, bits) and accuracy over a split (max_batches 0 = all)."""
  total_nll = total_acc = count = 0.0
  rows = spread_indices(len(codes), max_batches * batch_size)
  for batch in codes_lib.iterate_codes_once(codes, batch_size, indices=rows):
    arrays = parallel.host_to_global(batch, mesh)
    nll, acc = eval_fn(params, arrays)
    valid = arrays["valid"]
    total_nll += float(jnp.sum(jnp.where(valid, nll, 0.0)))
    total_acc += float(jnp.sum(jnp.where(valid, acc, 0.0)))
    count += float(jnp.sum(valid))
  count = max(count, 1.0)
  return {"nll_nats": total_nll / count, "nll_bits": total_nll / count / math.log(2),
          "accuracy": total_acc / count, "num_examples": int(count)}


def build_task(config, level: str, mesh, workdir: str) -> loop.TrainTask:
  """The TrainTask of prior_<level> on the code shards in <workdir>/extract."""
  extract_dir = loop.stage_dir(workdir, "extract")
  train_codes = codes_lib.CodeShards(extract_dir, "train")
  manifest = train_codes.manifest
  _, upper, _ = common.prior_level_info(manifest, level)
  prior = common.build_prior(config, level, manifest)
  t = config.priors[level].train
  loader = codes_lib.CodeLoader(train_codes, t.batch_size, seed=config.data.seed)
  eval_fn = make_eval_fn(prior, level, upper, mesh)
  has_val = "val" in manifest["splits"]
  val_codes = codes_lib.CodeShards(extract_dir, "val") if has_val else None

  def evaluate(state):
    params = state.ema_params if t.param_ema_decay > 0 else state.params
    return dataset_nll(eval_fn, params, val_codes, t.batch_size, mesh, t.eval_batches)

  h, w = manifest["shapes"][level]
  return loop.TrainTask(
      name=stage_name(level), init_variables=common.prior_init_fn(prior, manifest, level),
      loss_fn=make_loss_fn(prior, level, upper), loader=loader,
      evaluate=evaluate if has_val else None,
      progress_keys=("loss", "nll_bits", "accuracy"), throughput_name="latents_per_sec",
      throughput_per_example=h * w)


def run(config, workdir: str) -> None:
  """Trains the prior named by config.stage (prior_top / prior_mid / prior_bottom)."""
  level = config.stage[len("prior_"):]
  mesh = common.setup_runtime(config)
  task = build_task(config, level, mesh, workdir)
  loop.train(task, config.priors[level].train, workdir=workdir, mesh=mesh,
             axis_rules=config.axis_rules, seed=config.seed, config=config)
  parallel.print0(f"[{task.name}] done.")
