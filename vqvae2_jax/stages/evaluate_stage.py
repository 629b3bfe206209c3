"""Stage 5: the paper's quantitative evaluation (section 5) of one workdir.

Writes <workdir>/evaluate/{report.json, report.md, tradeoff.png, guidance.png} with,
where the inputs exist (a missing input skips its section with a note in the report):
- Table 1 (`eval.table1`): train / validation NLL of each prior on the extracted code
  shards (EMA parameters when kept) and train / validation MSE of the VQ-VAE.
- Sample distances (`eval.distances`): FID and Inception Score of samples against real
  validation images, FID* against VQ-VAE reconstructions of them, FID of
  reconstructions, improved precision / recall (k=3).
- CAS (`eval.cas`) and every sample metric for each rejection keep fraction in
  evaluate.keep_fractions (`eval.tradeoff`, Figure 7), flagged when the selecting
  network also computes the distances (self-judged); beside them, the same metrics for
  each classifier-free guidance scale in evaluate.guidance_scales (no rejection), every
  row with its sampling cost per accepted image, counted and timed; with
  evaluate.cas_per_point a CAS classifier per row; guidance.png shows the same draws at
  every scale.
- Rate-distortion of the image codec (`eval.rate_distortion`) against JPEG, WebP and the
  raw index cost on evaluate.rate_distortion_images validation images (0 = off).

The stage loads the run (`api.load`) and runs the evaluators in `STEPS`, each adding its
figures and notes to the report; the evaluators take built models and `EvalOptions`.
On many processes every process runs every step alike: candidates are drawn, scored and
featurised on all devices of all processes (each process its rows of every batch, the
results gathered), and process 0 alone writes the files (`eval.tradeoff`, `parallel`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import images as image_lib
from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import parallel
from vqvae2_jax import storage
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data.sources import make_source, spread_subset
from vqvae2_jax.codec import stream as codec_stream
from vqvae2_jax.eval import cas
from vqvae2_jax.eval import rate_distortion
from vqvae2_jax.eval import distances
from vqvae2_jax.eval import report as report_lib
from vqvae2_jax.eval import table1
from vqvae2_jax.eval import tradeoff
from vqvae2_jax.eval.options import EvalOptions
from vqvae2_jax.eval.reconstruction import make_reconstruct_fn
from vqvae2_jax.eval.validation_pass import validation_pass
from vqvae2_jax.sampling import rejection
from vqvae2_jax.sampling import scorers
from vqvae2_jax.workdir import CLASSIFIER, EVALUATE, VQVAE, StageMissingError, prior_stage

NAME = EVALUATE
CAS_SAMPLES, CAS_REAL = f"{NAME}/cas_samples", f"{NAME}/cas_real"
GUIDANCE_GRID = "guidance.png"  # every guidance scale on the same draws
REJECTION_KINDS = ("none", "trained", "efficientnet_lite0")

_START = [time.time()]


def log(msg: str) -> None:
  """Prints `msg` (process 0) with the seconds since the stage started."""
  parallel.print0(f"[{NAME}] {msg} | {time.time() - _START[0]:.0f}s elapsed")


@dataclasses.dataclass
class _Evaluation:
  """What the steps share: the loaded run, the options and the report being built."""
  run: api.Run
  opts: EvalOptions
  rejection_kind: str
  report: dict
  notes: list
  fid_net: distances.Network | None = None
  pr_net: distances.Network | None = None
  sampler: Any = None
  val_source: Any = None
  real_clf: tuple | None = None  # (model, params, where)
  selector: tradeoff.Selector | None = None
  candidates: tradeoff.Candidates | None = None
  masks: dict | None = None
  mean_scores: dict | None = None
  score_seconds: float | None = None  # rejection scoring per candidate (timed)
  guided: dict = dataclasses.field(default_factory=dict)  # w -> (Candidates, masks, means)
  classifiers: dict = dataclasses.field(default_factory=dict)
  real: distances.RealReference | None = None

  @property
  def config(self):
    return self.run.config

  @property
  def mesh(self):
    return self.run.mesh


def _start(config, workdir: str, mesh) -> _Evaluation:
  """Checks the settings, loads the run and opens the report."""
  e = config.evaluate
  opts = EvalOptions.from_mapping(e.to_dict())
  parallel.check_batch_size(opts.batch_size, mesh, "evaluate.batch_size")
  kind = e.rejection_classifier or config.sample.rejection.classifier
  if kind not in REJECTION_KINDS:
    raise ValueError(f"config.evaluate.rejection_classifier={kind!r}: use one of "
                     f"{REJECTION_KINDS} ('' follows sample.rejection.classifier)")
  run = api.load(workdir, config=config, mesh=mesh)
  if not run.has(VQVAE):
    raise ckpt_lib.CheckpointError(
        f"no stage-1 (vqvae) checkpoint in {run.workdir.checkpoint_dir(VQVAE)}: run the "
        "vqvae stage with the same --workdir first")
  run.workdir.write_config(NAME, config)
  notes: list[str] = []
  report = {"experiment": config.experiment, "workdir": storage.absolute(workdir),
            "settings": e.to_dict(), "notes": notes, "vqvae_step": run.vqvae_step}
  return _Evaluation(run, opts, kind, report, notes)


def _networks(ev: _Evaluation) -> None:
  """The feature networks of FID / IS / FID* and of precision/recall."""
  ev.fid_net, ev.pr_net = distances.resolve_networks(ev.opts, ev.mesh, ev.notes, log)
  ev.report["networks"] = {r: (n.info | {"label": n.label}) if n else None
                           for r, n in (("fid", ev.fid_net), ("precision_recall", ev.pr_net))}


def _sampler(ev: _Evaluation) -> None:
  """The hierarchical sampler, when the codes are extracted and every prior trained."""
  levels = ev.run.level_names
  if ev.run.workdir.has_manifest() and all(ev.run.has(prior_stage(l)) for l in levels):
    ev.sampler = ev.run.sampler()
  else:
    ev.notes.append("sample metrics (FID, IS, FID*, precision/recall, CAS, rejection) "
                    "skipped: the codes must be extracted and every prior "
                    f"({', '.join(levels)}) trained")


def _table1(ev: _Evaluation) -> None:
  """Table 1: NLL of each trained prior, MSE of the VQ-VAE."""
  run, w = ev.run, ev.run.workdir
  priors, shards = {}, {}
  try:
    manifest = run.manifest
  except StageMissingError as err:
    ev.notes.append(f"prior NLL skipped: {err}")
    manifest = {"levels": [], "splits": []}
  for level in manifest["levels"]:
    name = prior_stage(level)
    if level not in ev.config.priors or not run.has(name):
      ev.notes.append(f"{name}: no checkpoint, its NLL is skipped (train it with the {name} "
                      "stage)")
      continue
    kind = "ema" if w.inference_params_key(name) == "ema_params" else "raw"
    priors[level] = table1.LevelPrior(*run.prior(level),
                                      builders.prior_level_info(manifest, level)[1], kind)
  shards = {split: codes_lib.CodeShards(w.extract_dir, split) for split in manifest["splits"]}
  sources = {split: make_source(ev.config.data, split) for split in ("train", "val")}
  ev.report["table1"] = table1.table1(*run.vqvae, sources, priors, shards, ev.opts, ev.mesh,
                                      log)


def _train_classifier(ev: _Evaluation, model, source, stage: str):
  """Params of the experiment's classifier trained (or resumed) on `source` into `stage`."""
  c, w = ev.config, ev.run.workdir
  return cas.train_classifier(
      model, source, make_source(c.data, "val"), c.classifier.train, ev.mesh, name=stage,
      directory=w.stage_dir(stage), checkpoint_dir=w.checkpoint_dir(stage),
      image_size=c.data.image_size, axis_rules=c.axis_rules, seed=c.seed,
      data_seed=c.data.seed, num_threads=c.data.num_threads)


def _real_classifier(ev: _Evaluation) -> None:
  """The classifier trained on real data (the classifier stage's, else trained now),
  when CAS or 'trained' rejection needs it and the model and data are labelled."""
  ev.val_source = spread_subset(make_source(ev.config.data, "val"), ev.opts.max_real_images)
  labelled = (ev.sampler is not None and ev.sampler.num_classes >= 2
              and ev.val_source.num_classes >= 2)
  if not labelled or not (ev.opts.cas or ev.rejection_kind == "trained"):
    return
  if ev.run.has(CLASSIFIER):
    ev.real_clf = (*ev.run.classifier, CLASSIFIER)
    return
  log(f"no '{CLASSIFIER}' checkpoint: training the real-data classifier into {CAS_REAL}")
  train_source = make_source(ev.config.data, "train")
  model = builders.build_classifier(ev.config, train_source.num_classes)
  ev.real_clf = (model, _train_classifier(ev, model, train_source, CAS_REAL), CAS_REAL)


def _selector(ev: _Evaluation) -> tradeoff.Selector | None:
  """The rejection scorer of evaluate.rejection_classifier, or None."""
  kind, opts = ev.rejection_kind, ev.opts
  if kind == "efficientnet_lite0":
    net = ev.fid_net if ev.fid_net is not None and ev.fid_net.name == kind else (
        distances.load_network(kind, opts.efficientnet_weights, ev.mesh, ev.notes, log))
    if net is not None:
      class_map = ev.config.sample.rejection.class_map
      if not class_map:
        ev.notes.append("rejection with efficientnet_lite0 but sample.rejection.class_map "
                        "is empty: labels are taken as ImageNet-1k indices")
      score = scorers.network_scorer(net.apply_fn, net.variables, net.info["logits_key"],
                                     ev.mesh, opts.batch_size)
      return tradeoff.Selector("efficientnet_lite0 (ImageNet)", score,
                               rejection.class_map_for(kind, class_map), kind)
    ev.notes.append("rejection classifier efficientnet_lite0 unavailable (needs its "
                    "weights file or a converted .npz): using the classifier trained on the "
                    "data")
    kind = "trained"
  if kind == "trained" and ev.real_clf is not None:
    model, params, where = ev.real_clf
    return tradeoff.Selector(f"trained ({where})",
                             scorers.classifier_scorer(model, params, ev.mesh,
                                                       opts.batch_size),
                             None, None)  # its classes are the data's: no class map
  return None


def _model_steps(ev: _Evaluation) -> dict:
  """The checkpoint steps candidates are drawn from (part of their resume key)."""
  w = ev.run.workdir
  return dict(vqvae_step=ev.run.vqvae_step,
              priors={l: w.latest_step(prior_stage(l)) for l in ev.sampler.levels})


def _candidates(ev: _Evaluation) -> None:
  """Candidates (generated or resumed), their scores and each keep fraction's selection."""
  if ev.sampler is None:
    return
  w, opts = ev.run.workdir, ev.opts
  if ev.sampler.num_classes and ev.rejection_kind != "none":
    ev.selector = _selector(ev)
  if ev.selector is None:
    ev.notes.append(f"rejection trade-off skipped: no rejection classifier "
                    f"({ev.rejection_kind!r}) or an unconditional model; samples are "
                    "evaluated as drawn")
  fractions = tradeoff.keep_fractions(opts, ev.selector is not None)
  num = rejection.num_candidates(opts.num_images, min(fractions))
  log(f"{num} candidates for keep fractions {fractions} ({opts.num_images} images each)")
  ev.candidates = tradeoff.generate_candidates(
      ev.sampler, num, w.path_in(NAME, "candidates"), seed=opts.seed,
      image_size=ev.config.data.image_size, model_steps=_model_steps(ev), log=log,
      # Classifiers trained on the old candidates no longer describe these.
      on_restart=lambda: _remove_cas_classifiers(ev, "", "_keep*"))
  scores = None
  if ev.selector is not None:
    log(f"scoring {num} candidates with the {ev.selector.name} classifier")
    scores, ev.score_seconds = tradeoff.score_candidates(ev.selector.score, ev.candidates,
                                                         ev.selector.class_map)
    ev.report["rejection_classifier"] = ev.selector.name
  ev.masks, ev.mean_scores = tradeoff.select(scores, ev.candidates.labels, opts.num_images,
                                             fractions)


def _cas_classifiers(ev: _Evaluation) -> None:
  """The classifiers CAS tests: the real-data one and one trained on the unrejected
  samples only; with evaluate.cas_per_point also one per other trade-off point (each
  keep fraction's accepted samples, each guidance scale's samples)."""
  if not ev.opts.cas:
    return
  if ev.real_clf is None:
    if ev.sampler is not None:
      ev.notes.append("CAS skipped: it needs a class-conditional model and labelled data")
    return
  ev.classifiers = {"real_trained": ev.real_clf[:2]}
  rows = np.nonzero(ev.masks[1.0])[0]
  batch = ev.config.classifier.train.batch_size
  if len(rows) < batch:
    ev.notes.append(f"CAS on samples skipped: {len(rows)} samples, fewer than one "
                    f"classifier batch ({batch})")
    return
  base = ev.sampler.options.guidance
  points = [(1.0, base, ev.candidates, rows)]
  if ev.opts.cas_per_point:
    points += [(f, base, ev.candidates, np.nonzero(m)[0]) for f, m in ev.masks.items()
               if f != 1.0]
    points += [(1.0, w, cands, np.nonzero(masks[1.0])[0])
               for w, (cands, masks, _) in ev.guided.items()]
  for keep, w, cands, rows in points:
    name = tradeoff.cas_name(keep, w, base)
    source = cas.ArraySource(cands.images, cands.labels, ev.val_source.class_names,
                             rows=rows)
    log(f"CAS: training the classifier {name} on {len(rows)} samples only")
    model = builders.build_classifier(ev.config, source.num_classes)
    stage = CAS_SAMPLES + tradeoff.cas_suffix(keep, w, base)
    ev.classifiers[name] = (model, _train_classifier(ev, model, source, stage))


def _remove_cas_classifiers(ev: _Evaluation, *suffix_patterns: str) -> None:
  """Removes the CAS classifiers trained on candidates that are being redrawn: the
  folders CAS_SAMPLES + suffix for every suffix matching one of `suffix_patterns` (globs
  over `tradeoff.cas_suffix` values)."""
  for pattern in suffix_patterns:
    for directory in storage.glob(ev.run.workdir.stage_dir(CAS_SAMPLES + pattern)):
      storage.rmtree(directory)


def _validation(ev: _Evaluation) -> None:
  """One pass over the validation images: reference statistics (cached), FID of
  reconstructions, CAS accuracies."""
  if ev.fid_net is None and ev.pr_net is None and not ev.classifiers:
    return
  d, opts, n = ev.config.data, ev.opts, len(ev.val_source)
  ev.real = distances.RealReference(
      ev.fid_net, ev.pr_net, n, opts, ev.mesh, ev.run.workdir.stage_dir(NAME),
      dict(source=d.source, root=d.root, tfds=d.tfds_name, split=d.val_split,
           size=d.image_size, n=n))
  accuracy = (cas.ClassifierAccuracy(ev.classifiers, opts.batch_size, ev.mesh)
              if ev.classifiers else None)
  log(f"validation pass over {n} images"
      + ("" if ev.real.need_real else " (reference statistics cached)"))
  vqvae, variables = ev.run.vqvae
  validation_pass(ev.val_source, make_reconstruct_fn(vqvae, ev.mesh), variables,
                  [c for c in (ev.real, accuracy) if c is not None], opts.batch_size,
                  ev.mesh, log)
  ev.real.finish(log)
  if ev.fid_net is not None:
    ev.report["reconstructions"] = ev.real.reconstruction_metrics(ev.notes)
  if accuracy is not None:
    ev.report["cas"] = accuracy.result()


def _sample_metrics(ev: _Evaluation) -> None:
  """FID / FID* / IS / precision-recall of each keep fraction's selection."""
  fid, pr = ev.fid_net, ev.pr_net
  if fid is None and pr is None:
    ev.notes.append("FID, IS, FID* and precision/recall skipped: no feature network could "
                    "be loaded (give config.evaluate.inception_weights, or the "
                    "EfficientNet-Lite0 weights for the fallback)")
    return
  if ev.candidates is None:
    return
  stats = distances.selection_stats(ev.candidates.images, ev.masks, fid, pr, ev.opts,
                                    ev.mesh, log)
  log("computing FID / IS / precision / recall")
  real = ev.real
  rows = tradeoff.tradeoff_rows(stats, ev.mean_scores, ev.opts.num_images, real.ref,
                                real.recon_ref, real.real_pr, ev.opts, ev.notes,
                                guidance=ev.sampler.options.guidance,
                                seconds=(ev.candidates.seconds_per_image, ev.score_seconds))
  tradeoff.attach_cas(rows, ev.report.get("cas"), ev.sampler.options.guidance)
  ev.report["samples"], ev.report["tradeoff"] = rows[0], rows
  if ev.selector is None:
    return
  judged = tradeoff.self_judged(ev.selector.network, fid and fid.name, pr and pr.name)
  ev.report["self_judged"] = bool(judged)
  if judged:
    warning = tradeoff.self_judged_warning(ev.selector.name, judged)
    ev.report["self_judged_warning"] = warning
    ev.notes.append(warning)
    log(warning)


def _guidance_candidates(ev: _Evaluation) -> None:
  """Classifier-free guidance beside rejection: per evaluate.guidance_scales w (other than
  the sampler's own, which the keep-1 row already measures), num_images samples drawn at
  w without rejection (resumable), scored by the rejection classifier for the report."""
  base = ev.sampler.options.guidance if ev.sampler is not None else 1.0
  scales = ev.config.evaluate.get("guidance_scales", ())
  scales = [w for w in dict.fromkeys(float(w) for w in scales) if w != base]
  if (not scales or ev.sampler is None or ev.candidates is None
      or (ev.fid_net is None and ev.pr_net is None)):
    return  # what is missing is already in the notes (see _sample_metrics)
  opts = ev.opts
  for w in scales:
    try:  # the sampler refuses unconditional priors and priors without a null label
      sampler = ev.run.sampler(dataclasses.replace(ev.sampler.options, guidance=w))
    except ValueError as err:
      ev.notes.append(f"guidance scales {scales} skipped: {err}")
      return
    log(f"{opts.num_images} samples at guidance w={w:g}")
    cands = tradeoff.generate_candidates(
        sampler, opts.num_images, ev.run.workdir.path_in(NAME, f"guidance_{w:g}"),
        seed=opts.seed, image_size=ev.config.data.image_size, model_steps=_model_steps(ev),
        on_restart=lambda w=w: _remove_cas_classifiers(ev, tradeoff.cas_suffix(1.0, w, base)),
        log=log)
    scores = (None if ev.selector is None else
              tradeoff.score_candidates(ev.selector.score, cands, ev.selector.class_map)[0])
    masks, mean = tradeoff.select(scores, cands.labels, opts.num_images, [1.0])
    ev.guided[w] = (cands, masks, mean)


def _guidance_metrics(ev: _Evaluation) -> None:
  """FID / IS / precision-recall (and CAS) of each guidance scale's samples
  (`report['guidance']`)."""
  if not ev.guided or ev.real is None:
    return
  rows = []
  for w, (cands, masks, mean) in ev.guided.items():
    stats = distances.selection_stats(cands.images, masks, ev.fid_net, ev.pr_net, ev.opts,
                                      ev.mesh, log)
    rows += tradeoff.tradeoff_rows(stats, mean, ev.opts.num_images, ev.real.ref,
                                   ev.real.recon_ref, ev.real.real_pr, ev.opts, ev.notes,
                                   guidance=w, seconds=(cands.seconds_per_image, None))
  tradeoff.attach_cas(rows, ev.report.get("cas"), ev.sampler.options.guidance)
  ev.report["guidance"] = rows
  tiles, cols, names, captions = tradeoff.guidance_grid(
      {ev.sampler.options.guidance: ev.candidates,
       **{w: cands for w, (cands, _, _) in ev.guided.items()}}, ev.run.class_names or [])
  if len(tiles) and parallel.is_main_process():
    image_lib.save_grid(ev.run.workdir.path_in(NAME, GUIDANCE_GRID), tiles, cols,
                        row_labels=[n[:14] for n in names], captions=captions)
    ev.report["guidance_grid"] = GUIDANCE_GRID


def _rate_distortion(ev: _Evaluation) -> None:
  """The codec's bits per pixel and PSNR / SSIM against JPEG, WebP and raw indices on
  evaluate.rate_distortion_images validation images (0 = off)."""
  n = int(ev.config.evaluate.rate_distortion_images)
  if not n:
    return
  if ev.sampler is None:
    ev.notes.append("rate-distortion skipped: the codec needs every prior trained")
    return
  source = spread_subset(make_source(ev.config.data, "val"), n)
  images = np.stack([source.get(i)[0] for i in range(len(source))])
  run = ev.run
  log(f"rate-distortion of the codec on {len(images)} validation images")
  header = codec_stream.unpack(run.compress(images[:1])[0])[0].size_bytes
  result = rate_distortion.rate_distortion(
      images, run.compress, run.decompress,
      latents_per_image=sum(int(np.prod(s)) for s in run.manifest["shapes"].values()),
      num_codes=int(run.manifest["num_codes"]), header_bytes=header,
      code_length_bits=lambda streams: run.log_prob(
          images, [codec_stream.unpack(s)[0].label for s in streams]
          if run.num_classes and run.codec.conditional else None)["bits"])
  out_dir = run.workdir.stage_dir(NAME)
  if parallel.is_main_process():
    storage.makedirs(out_dir)
    rate_distortion.plot(result, storage.join(out_dir, "rate_distortion.png"))
  ev.report["rate_distortion"] = result


STEPS: tuple[Callable[[_Evaluation], None], ...] = (
    _networks, _sampler, _table1, _real_classifier, _candidates, _guidance_candidates,
    _cas_classifiers, _validation, _sample_metrics, _guidance_metrics, _rate_distortion)


def run(config, workdir: str) -> None:
  """Evaluates everything that is trained in `workdir` (see the module docstring)."""
  _START[0] = time.time()
  ev = _start(config, workdir, parallel.setup_runtime(config))
  for step in STEPS:
    step(ev)
  out_dir = ev.run.workdir.stage_dir(NAME)
  if parallel.is_main_process():
    report_lib.write(ev.report, out_dir)
  log(f"wrote {out_dir}/report.md and report.json")
