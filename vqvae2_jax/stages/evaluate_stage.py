"""Stage 5: the paper's quantitative evaluation (section 5) of one workdir.

Writes <workdir>/evaluate/{report.json, report.md, tradeoff.png, guidance.png,
rate_distortion.png} with, where the inputs exist (a missing input skips its section
with a note in the report), one section per evaluator of `eval.evaluators`:
- Table 1: train / validation NLL of each prior on the extracted code shards (EMA
  parameters when kept) and train / validation MSE of the VQ-VAE.
- Sample distances: FID and Inception Score of samples against real validation images,
  FID* against VQ-VAE reconstructions of them, FID of reconstructions, improved
  precision / recall (k=3), for each rejection keep fraction in evaluate.keep_fractions
  (Figure 7), flagged when the selecting network also computes the distances
  (self-judged); every row with its sampling cost per accepted image, counted and timed.
- Guidance: the same metrics for each classifier-free guidance scale in
  evaluate.guidance_scales (no rejection); guidance.png shows the same draws at every
  scale.
- CAS: classifiers trained on samples (with evaluate.cas_per_point one per trade-off
  point) and on real data, tested on real and reconstructed validation images.
- Rate-distortion of the image codec against JPEG, WebP and the raw index cost on
  evaluate.rate_distortion_images validation images (0 = off).

The stage loads the run (`api.load`), builds the evaluators from config.evaluate over
the run's shared, memoised inputs (`eval.evaluators.EvalInputs`), runs them in turn and
writes what they yield. On many processes every process runs every evaluator alike:
candidates are drawn, scored and featurised on all devices of all processes (each
process its rows of every batch, the results gathered), and process 0 alone writes the
files (`eval.tradeoff`, `parallel`).
"""
from __future__ import annotations

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import parallel
from vqvae2_jax import storage
from vqvae2_jax.eval import evaluators
from vqvae2_jax.eval import report as report_lib
from vqvae2_jax.eval.options import EvalOptions
from vqvae2_jax.registry import EVALUATE, REJECTION_KINDS, VQVAE

NAME = EVALUATE
__all__ = ["NAME", "REJECTION_KINDS", "open_inputs", "run"]


def open_inputs(config, workdir: str) -> evaluators.EvalInputs:
  """The run of `workdir` loaded, with the evaluators' shared inputs, after checking the
  settings (every process)."""
  log = evaluators.EvalLog(NAME)  # its clock starts with the stage
  e = config.evaluate
  opts = EvalOptions.from_mapping(e.to_dict())
  parallel.check_batch_size(opts.batch_size, "evaluate.batch_size")
  kind = e.rejection_classifier or config.sample.rejection.classifier
  if kind not in REJECTION_KINDS:
    raise ValueError(f"config.evaluate.rejection_classifier={kind!r}: use one of "
                     f"{REJECTION_KINDS} ('' follows sample.rejection.classifier)")
  run = api.load(workdir, config=config)
  if not run.has(VQVAE):
    raise ckpt_lib.CheckpointError(
        f"no stage-1 (vqvae) checkpoint in {run.workdir.checkpoint_dir(VQVAE)}: run the "
        "vqvae stage with the same --workdir first")
  run.workdir.write_config(NAME, config)
  return evaluators.EvalInputs(run, opts, log, kind, evaluators.RunBuilders(
      classifier=lambda num_classes: builders.build_classifier(run.config, num_classes),
      upper_levels=lambda manifest, level: builders.prior_level_info(manifest, level)[1]))


def run(config, workdir: str) -> None:
  """Evaluates everything that is trained in `workdir` (see the module docstring)."""
  inputs = open_inputs(config, workdir)
  report = {"experiment": config.experiment, "workdir": storage.absolute(workdir),
            "settings": config.evaluate.to_dict(), "notes": inputs.log.notes,
            "vqvae_step": inputs.run.vqvae_step}
  out_dir = inputs.run.workdir.stage_dir(NAME)
  for evaluator in evaluators.from_config(config.evaluate, inputs):
    for result in evaluator.run():
      if not isinstance(result, evaluators.Figure):
        key, value = result
        report[key] = value
      elif parallel.is_main_process():  # every process computes, process 0 writes
        storage.makedirs(out_dir)
        result.save(storage.join(out_dir, result.filename))
  if parallel.is_main_process():
    report_lib.write(report, out_dir)
  inputs.log(f"wrote {out_dir}/report.md and report.json")
