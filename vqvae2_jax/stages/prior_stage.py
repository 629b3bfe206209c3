"""Stage 2b: train the prior of one level on extracted codes (paper Algorithm 2, 8-9).

`prior_top` models p(e_top | class); `prior_mid` / `prior_bottom` model
p(e_l | e_above, class) with a conditioning stack over the levels above. Loss: categorical
cross-entropy over the K codes; NLL is reported per latent in nats and bits (Table 1).
Writes <workdir>/prior_<level>/{config.json, metrics.jsonl, curves.png, checkpoints/}.
"""
from __future__ import annotations

from vqvae2_jax import builders
from vqvae2_jax import parallel
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.eval import likelihood
from vqvae2_jax.train import loop, losses
from vqvae2_jax.registry import TRAIN, VAL, prior_level, prior_stage
from vqvae2_jax.workdir import Workdir


def build_task(config, level: str, workdir: Workdir) -> loop.TrainTask:
  """The TrainTask of prior_<level> on the code shards in <workdir>/extract."""
  manifest = workdir.manifest()
  train_codes = codes_lib.CodeShards(workdir.extract_dir, TRAIN)
  _, upper, _ = builders.prior_level_info(manifest, level)
  prior = builders.build_prior(config, level, manifest)
  t = config.priors[level].train
  loader = codes_lib.CodeLoader(train_codes, t.batch_size, seed=config.data.seed)
  nll_fn = likelihood.make_nll_fn(prior, level, upper)
  has_val = VAL in manifest["splits"]
  val_codes = codes_lib.CodeShards(workdir.extract_dir, VAL) if has_val else None

  def evaluate(state):
    params = state.ema_params if t.param_ema_decay > 0 else state.params
    return likelihood.dataset_nll(nll_fn, params, val_codes, t.batch_size,
                                  t.eval_batches)

  h, w = manifest["shapes"][level]
  return loop.TrainTask(
      name=prior_stage(level), init_variables=builders.prior_init_fn(prior, manifest, level),
      loss_fn=losses.prior_loss_fn(prior, level, upper), loader=loader,
      evaluate=evaluate if has_val else None,
      progress_keys=("loss", "nll_bits", "accuracy"), throughput_name="latents_per_sec",
      throughput_per_example=h * w)


def run(config, workdir: str) -> None:
  """Trains the prior named by config.stage (prior_top / prior_mid / prior_bottom)."""
  level = prior_level(config.stage)
  w = Workdir(workdir)
  name = prior_stage(level)
  w.write_config(name, config)
  task = build_task(config, level, w)
  loop.train(task, config.priors[level].train, directory=w.stage_dir(name),
             checkpoint_dir=w.checkpoint_dir(name), seed=config.seed)
  parallel.print0(f"[{name}] done.")
