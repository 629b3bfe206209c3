"""Stage 1: train the hierarchical VQ-VAE (paper Algorithm 1).

Loss: MSE(x, D(e)) + beta * sum_l ||sg[e_l] - E_l(x)||^2 on images in [-1, 1]; codebooks
follow the EMA updates. Writes <workdir>/vqvae/{metrics.jsonl, checkpoints/,
reconstructions.png} (validation originals on the first row, reconstructions below).
"""
from __future__ import annotations

import jax
import numpy as np

from vqvae2_jax import images as image_lib
from vqvae2_jax import plots
from vqvae2_jax import parallel
from vqvae2_jax.data.loader import BatchLoader, iterate_once
from vqvae2_jax.data.sources import make_source, spread_subset
from vqvae2_jax.models import vqvae as vqvae_model
from vqvae2_jax import builders
from vqvae2_jax.eval.reconstruction import make_reconstruct_fn, reconstruction_mse
from vqvae2_jax.train import loop, losses
from vqvae2_jax.registry import TRAIN, VAL, VQVAE, level_names
from vqvae2_jax.workdir import Workdir

NAME = VQVAE


class UsageWarning:
  """Stage 1's `TrainTask.on_log`: warns when a level's code usage stays low.

  Called with each train row (code_usage: one fraction of the K codes per level, top
  first); once a level has been below `threshold` for `patience` consecutive logs it
  prints one warning naming the level and the codebook options, and again only after the
  level has recovered and fallen back. Returns the warnings of this call (for tests).
  """

  def __init__(self, names, threshold: float, patience: int = 3):
    self.names, self.threshold, self.patience = tuple(names), threshold, patience
    self.streak = [0] * len(self.names)

  def __call__(self, step: int, row: dict) -> list[str]:
    usage = row.get("code_usage")
    if self.threshold <= 0 or usage is None:
      return []
    usage = usage if isinstance(usage, list) else [usage]
    warnings = []
    for l, (name, value) in enumerate(zip(self.names, usage)):
      self.streak[l] = self.streak[l] + 1 if value < self.threshold else 0
      if self.streak[l] == self.patience:
        warnings.append(
            f"[{NAME}] warning at step {step}: level '{name}' uses {100 * value:.1f}% of its "
            f"codes (< {100 * self.threshold:.0f}% for {self.patience} logs); consider "
            "vqvae.dead_code_threshold=1 (re-seeds unused codes) and vqvae.lookup_dim=8 "
            "(together: every code used and the lowest MSE measured, benchmarks/README.md)")
    for w in warnings:
      parallel.print0(w)
    return warnings


def save_reconstruction_grid(reconstruct, variables, val_source, path: str,
                             num: int = 8) -> str:
  """Validation originals (row 1) above their reconstructions (row 2)."""
  devices = parallel.current_mesh().size
  num = max(devices, num - num % devices)
  batch = next(iter(iterate_once(spread_subset(val_source, num), num)))
  arrays = parallel.host_to_global({"image": batch["image"]})
  recon = parallel.global_to_host(reconstruct(variables, arrays["image"]))
  originals = parallel.global_to_host(arrays["image"])
  grid = image_lib.interleave_rows(originals, image_lib.to_uint8(recon))
  if jax.process_index() == 0:
    image_lib.save_grid(path, grid, cols=len(originals),
                        row_labels=["original", "reconstruction"])
  return path


def _variables(state) -> dict:
  return {"params": state.params, **state.model_state}


def build_task(config, workdir: Workdir) -> loop.TrainTask:
  """The stage-1 TrainTask: model, loss, demo/folder/tfds loader, validation, grids."""
  t = config.vqvae_train
  model = builders.build_vqvae(config)
  accumulate = t.grad_accum_steps > 1
  train_source = make_source(config.data, TRAIN)
  val_source = make_source(config.data, VAL)
  loader = BatchLoader(train_source, t.batch_size, seed=config.data.seed,
                       num_threads=config.data.num_threads,
                       worker_count=config.data.worker_count)
  reconstruct = make_reconstruct_fn(model)
  grid_path = workdir.path_in(NAME, "reconstructions.png")

  def evaluate(state):
    return reconstruction_mse(reconstruct, _variables(state), val_source, t.batch_size,
                              t.eval_batches)

  names = level_names(config.vqvae.num_levels)

  def pictures(state, step):
    """Reconstructions, the paper's Figure 3 (level subsets) and codebook usage."""
    del step
    variables = _variables(state)
    save_reconstruction_grid(reconstruct, variables, val_source, grid_path)
    originals = np.stack([val_source.get(i)[0] for i in range(min(6, len(val_source)))])
    subsets = plots.level_subset_images(model, variables, originals)  # every process
    if jax.process_index() == 0:
      plots.save_level_subset_figure(subsets, originals, names,
                                     workdir.path_in(NAME, "level_subsets.png"),
                                     scale=2)
      plots.codebook_usage_histogram(variables, names,
                                     workdir.path_in(NAME, "codebook_usage.png"))

  return loop.TrainTask(
      name=NAME, init_variables=builders.vqvae_init_fn(model, config.data.image_size),
      loss_fn=losses.vqvae_loss_fn(model, config.vqvae.beta, deferred_codebooks=accumulate),
      finalize_state=vqvae_model.finalize_codebooks(model) if accumulate else None,
      loader=loader, evaluate=evaluate,
      pictures=pictures, progress_keys=("loss", "mse", "psnr", "perplexity", "code_usage"),
      on_log=UsageWarning(names, t.get("usage_warning", 0.1)))


def run(config, workdir: str) -> None:
  """Trains stage 1 into <workdir>/vqvae (config: model fields already resolved)."""
  w = Workdir(workdir)
  w.write_config(NAME, config)
  task = build_task(config, w)
  loop.train(task, config.vqvae_train, directory=w.stage_dir(NAME),
             checkpoint_dir=w.checkpoint_dir(NAME), seed=config.seed)
  parallel.print0(f"[vqvae] done. Reconstructions: {w.path_in(NAME, 'reconstructions.png')}")
