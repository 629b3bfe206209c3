"""The expensive inputs the evaluators share, each computed once, on first use.

`EvalInputs` holds the loaded run and memoises what more than one evaluator needs: the
feature networks, the hierarchical sampler, the real-data classifier, the rejection
scorer, the candidate samples (drawn, scored, selected per keep fraction), the samples
of each guidance scale, the CAS classifiers trained on samples, and the one pass over
the validation images that yields the real-image statistics and the CAS accuracies.
Each is a `functools.cached_property`: asking for one computes what it depends on, so
no evaluator relies on another having run first. A missing input is None (or empty),
with a note in the run's `EvalLog`.

The run is used through what `api.Run` offers (models, sampler, codec, its workdir); the
model builders, which the library may not import, come in a `RunBuilders`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import numpy as np

from vqvae2_jax import registry
from vqvae2_jax import storage
from vqvae2_jax.data.sources import make_source, spread_subset
from vqvae2_jax.eval import cas
from vqvae2_jax.eval import distances
from vqvae2_jax.eval import tradeoff
from vqvae2_jax.eval.evaluators.common import EvalLog
from vqvae2_jax.eval.options import EvalOptions
from vqvae2_jax.eval.reconstruction import make_reconstruct_fn
from vqvae2_jax.eval.validation_pass import validation_pass
from vqvae2_jax.sampling import rejection
from vqvae2_jax.sampling import scorers


# The folders (workdir stages) of the evaluation's own classifiers.
CAS_SAMPLES = f"{registry.EVALUATE}/cas_samples"  # + tradeoff.cas_suffix of the point
CAS_REAL = f"{registry.EVALUATE}/cas_real"  # when the classifier stage has not run


@dataclasses.dataclass(frozen=True)
class RunBuilders:
  """The model builders the evaluators use, given by the caller (the library does not
  import `builders`).

  classifier: num_classes -> a ResNetClassifier of the experiment's architecture.
  upper_levels: (extraction manifest, level) -> the names of the levels above it (top
    first).
  """
  classifier: Callable[[int], Any]
  upper_levels: Callable[[dict, str], tuple[str, ...]]


class Drawn(NamedTuple):
  """Samples drawn at one guidance scale and their selection: masks keep fraction ->
  bool [M] accepted, mean_scores keep fraction -> mean class score (None unscored),
  score_seconds: scoring seconds per candidate (None unscored)."""
  candidates: tradeoff.Candidates
  masks: dict[float, np.ndarray]
  mean_scores: dict[float, float | None]
  score_seconds: float | None = None


class EvalInputs:
  """The run, the options and the memoised inputs of one evaluation.

  Attributes: run (an `api.Run`), opts (`EvalOptions`), log (`EvalLog`), rejection_kind
  (one of `registry.REJECTION_KINDS`), builders (`RunBuilders`).
  """

  def __init__(self, run, opts: EvalOptions, log: EvalLog, rejection_kind: str,
               builders: RunBuilders):
    self.run, self.opts, self.log = run, opts, log
    self.rejection_kind, self.builders = rejection_kind, builders

  @property
  def config(self):
    return self.run.config

  @property
  def base_guidance(self) -> float:
    """The sampler's own guidance scale."""
    return self.sampler.options.guidance if self.sampler is not None else 1.0

  # ---------------------------------------------------------------- models
  @functools.cached_property
  def networks(self) -> tuple[distances.Network | None, distances.Network | None]:
    """(network of FID / IS / FID*, network of precision/recall) (`distances`)."""
    fid, pr, notes = distances.resolve_networks(self.opts, self.log)
    self.log.note(*notes)
    return fid, pr

  @functools.cached_property
  def sampler(self):
    """The hierarchical sampler, when the codes are extracted and every prior trained."""
    run, levels = self.run, self.run.level_names
    if run.workdir.has_manifest() and all(run.has(registry.prior_stage(l)) for l in levels):
      return run.sampler()
    self.log.note("sample metrics (FID, IS, FID*, precision/recall, CAS, rejection) "
                  "skipped: the codes must be extracted and every prior "
                  f"({', '.join(levels)}) trained")
    return None

  @functools.cached_property
  def val_source(self):
    """The real validation images (up to opts.max_real_images, spread over the split)."""
    return spread_subset(make_source(self.config.data, registry.VAL), self.opts.max_real_images)

  def train_classifier(self, model, source, stage: str):
    """Params of `model` trained (or resumed) on `source` into the folder of `stage`."""
    c, w = self.config, self.run.workdir
    return cas.train_classifier(
        model, source, make_source(c.data, registry.VAL), c.classifier.train, name=stage,
        directory=w.stage_dir(stage), checkpoint_dir=w.checkpoint_dir(stage),
        image_size=c.data.image_size, seed=c.seed,
        data_seed=c.data.seed, num_threads=c.data.num_threads)

  @functools.cached_property
  def real_classifier(self) -> tuple[Any, Any, str] | None:
    """(model, params, where) of the classifier trained on real data (the classifier
    stage's, else trained now), when CAS or 'trained' rejection needs it and the model
    and data are labelled; else None."""
    labelled = (self.sampler is not None and self.sampler.num_classes >= 2
                and self.val_source.num_classes >= 2)
    if not labelled or not (self.opts.cas or self.rejection_kind == registry.REJECT_TRAINED):
      return None
    if self.run.has(registry.CLASSIFIER):
      return (*self.run.classifier, registry.CLASSIFIER)
    where = CAS_REAL
    self.log(f"no '{registry.CLASSIFIER}' checkpoint: training the real-data classifier "
             f"into {where}")
    train_source = make_source(self.config.data, registry.TRAIN)
    model = self.builders.classifier(train_source.num_classes)
    return model, self.train_classifier(model, train_source, where), where

  @functools.cached_property
  def selector(self) -> tradeoff.Selector | None:
    """The rejection scorer of evaluate.rejection_classifier (conditional models only),
    or None."""
    kind, opts = self.rejection_kind, self.opts
    if self.sampler is None or not self.sampler.num_classes or kind == registry.REJECT_NONE:
      return None
    if kind == registry.EFFICIENTNET_LITE0:
      fid = self.networks[0]
      net = fid if fid is not None and fid.name == kind else None
      if net is None:
        net, notes = distances.load_network(kind, opts.efficientnet_weights, self.log)
        self.log.note(*notes)
      if net is not None:
        class_map = self.config.sample.rejection.class_map
        if not class_map:
          self.log.note("rejection with efficientnet_lite0 but sample.rejection.class_map "
                        "is empty: labels are taken as ImageNet-1k indices")
        score = scorers.network_scorer(net.apply_fn, net.variables, net.info["logits_key"],
                                       opts.batch_size)
        return tradeoff.Selector("efficientnet_lite0 (ImageNet)", score,
                                 rejection.class_map_for(kind, class_map), kind)
      self.log.note("rejection classifier efficientnet_lite0 unavailable (needs its "
                    "weights file or a converted .npz): using the classifier trained on "
                    "the data")
      kind = registry.REJECT_TRAINED
    if kind == registry.REJECT_TRAINED and self.real_classifier is not None:
      model, params, where = self.real_classifier
      return tradeoff.Selector(f"trained ({where})",
                               scorers.classifier_scorer(model, params, opts.batch_size),
                               None, None)  # its classes are the data's: no class map
    return None

  # ---------------------------------------------------------------- samples
  @functools.cached_property
  def model_steps(self) -> dict:
    """The checkpoint steps candidates are drawn from (part of their resume key)."""
    w = self.run.workdir
    return dict(vqvae_step=self.run.vqvae_step,
                priors={l: w.latest_step(registry.prior_stage(l))
                        for l in self.sampler.levels})

  def remove_cas_classifiers(self, *suffix_patterns: str) -> None:
    """Removes the CAS classifiers trained on candidates that are being redrawn: the
    folders of cas_samples + suffix for every suffix matching one of `suffix_patterns`
    (globs over `tradeoff.cas_suffix` values)."""
    for pattern in suffix_patterns:
      for directory in storage.glob(self.run.workdir.stage_dir(CAS_SAMPLES
                                                               + pattern)):
        storage.rmtree(directory)

  @functools.cached_property
  def candidates(self) -> Drawn | None:
    """The candidates at the sampler's own scale (generated or resumed), their scores and
    each keep fraction's selection; None without a sampler."""
    if self.sampler is None:
      return None
    opts, log, selector = self.opts, self.log, self.selector
    if selector is None:
      log.note(f"rejection trade-off skipped: no rejection classifier "
               f"({self.rejection_kind!r}) or an unconditional model; samples are "
               "evaluated as drawn")
    fractions = tradeoff.keep_fractions(opts, selector is not None)
    num = rejection.num_candidates(opts.num_images, min(fractions))
    log(f"{num} candidates for keep fractions {fractions} ({opts.num_images} images each)")
    cands = tradeoff.generate_candidates(
        self.sampler, num, self.run.workdir.path_in(registry.EVALUATE, "candidates"),
        seed=opts.seed, image_size=self.config.data.image_size,
        model_steps=self.model_steps, log=log,
        # Classifiers trained on the old candidates no longer describe these.
        on_restart=lambda: self.remove_cas_classifiers("", "_keep*"))
    scores = seconds = None
    if selector is not None:
      log(f"scoring {num} candidates with the {selector.name} classifier")
      scores, seconds = tradeoff.score_candidates(selector.score, cands, selector.class_map)
    masks, mean = tradeoff.select(scores, cands.labels, opts.num_images, fractions)
    return Drawn(cands, masks, mean, seconds)

  @functools.cached_property
  def guided(self) -> dict[float, Drawn]:
    """Guidance scale w -> opts.num_images samples drawn at w without rejection
    (resumable), scored by the rejection scorer, for each of opts.guidance_scales other
    than the sampler's own (which the keep-1 row measures); empty when not evaluated."""
    base = self.base_guidance
    scales = [w for w in dict.fromkeys(float(w) for w in self.opts.guidance_scales)
              if w != base]
    if (not scales or self.candidates is None
        or all(n is None for n in self.networks)):
      return {}  # what is missing is already in the notes
    opts, out = self.opts, {}
    for w in scales:
      try:  # the sampler refuses unconditional priors and priors without a null label
        sampler = self.run.sampler(dataclasses.replace(self.sampler.options, guidance=w))
      except ValueError as err:
        self.log.note(f"guidance scales {scales} skipped: {err}")
        return {}
      self.log(f"{opts.num_images} samples at guidance w={w:g}")
      cands = tradeoff.generate_candidates(
          sampler, opts.num_images,
          self.run.workdir.path_in(registry.EVALUATE, f"guidance_{w:g}"),
          seed=opts.seed, image_size=self.config.data.image_size,
          model_steps=self.model_steps, log=self.log,
          on_restart=lambda w=w: self.remove_cas_classifiers(
              tradeoff.cas_suffix(1.0, w, base)))
      scores = (None if self.selector is None else tradeoff.score_candidates(
          self.selector.score, cands, self.selector.class_map)[0])
      masks, mean = tradeoff.select(scores, cands.labels, opts.num_images, [1.0])
      out[w] = Drawn(cands, masks, mean)
    return out

  # ---------------------------------------------------------------- CAS
  @functools.cached_property
  def cas_classifiers(self) -> dict[str, tuple[Any, Any]]:
    """name -> (model, params) of the classifiers CAS tests: the real-data one and one
    trained on the unrejected samples only; with opts.cas_per_point also one per other
    trade-off point (each keep fraction's accepted samples, each guidance scale's
    samples). Empty without CAS."""
    if not self.opts.cas:
      return {}
    if self.real_classifier is None:
      if self.sampler is not None:
        self.log.note("CAS skipped: it needs a class-conditional model and labelled data")
      return {}
    classifiers = {"real_trained": self.real_classifier[:2]}
    drawn = self.candidates
    rows = np.nonzero(drawn.masks[1.0])[0]
    batch = self.config.classifier.train.batch_size
    if len(rows) < batch:
      self.log.note(f"CAS on samples skipped: {len(rows)} samples, fewer than one "
                    f"classifier batch ({batch})")
      return classifiers
    base = self.base_guidance
    points = [(1.0, base, drawn.candidates, rows)]
    if self.opts.cas_per_point:
      points += [(f, base, drawn.candidates, np.nonzero(m)[0])
                 for f, m in drawn.masks.items() if f != 1.0]
      points += [(1.0, w, g.candidates, np.nonzero(g.masks[1.0])[0])
                 for w, g in self.guided.items()]
    for keep, w, cands, rows in points:
      name = tradeoff.cas_name(keep, w, base)
      source = cas.ArraySource(cands.images, cands.labels, self.val_source.class_names,
                               rows=rows)
      self.log(f"CAS: training the classifier {name} on {len(rows)} samples only")
      model = self.builders.classifier(source.num_classes)
      stage = CAS_SAMPLES + tradeoff.cas_suffix(keep, w, base)
      classifiers[name] = (model, self.train_classifier(model, source, stage))
    return classifiers

  # ---------------------------------------------------------------- validation pass
  @functools.cached_property
  def _validation(self) -> tuple[distances.RealReference | None, dict | None]:
    """One pass over the validation images: (reference statistics (cached between runs)
    and reconstruction statistics, `cas.ClassifierAccuracy.result` of every CAS
    classifier); None for what is not evaluated."""
    fid, pr = self.networks
    classifiers = self.cas_classifiers
    if fid is None and pr is None and not classifiers:
      return None, None
    d, opts, n = self.config.data, self.opts, len(self.val_source)
    real = distances.RealReference(
        fid, pr, n, opts, self.run.workdir.stage_dir(registry.EVALUATE),
        dict(source=d.source, root=d.root, tfds=d.tfds_name, split=d.val_split,
             size=d.image_size, n=n))
    accuracy = (cas.ClassifierAccuracy(classifiers, opts.batch_size)
                if classifiers else None)
    self.log(f"validation pass over {n} images"
             + ("" if real.need_real else " (reference statistics cached)"))
    vqvae, variables = self.run.vqvae
    validation_pass(self.val_source, make_reconstruct_fn(vqvae), variables,
                    [c for c in (real, accuracy) if c is not None], opts.batch_size,
                    self.log)
    real.finish(self.log)
    return real, (accuracy.result() if accuracy is not None else None)

  @property
  def real_reference(self) -> distances.RealReference | None:
    """The real side of every distance (`distances.RealReference`), after the pass."""
    return self._validation[0]

  @property
  def cas_accuracy(self) -> dict | None:
    """'<classifier>_on_real' / '_on_recon' -> {'top1', 'top5', 'num_images'}."""
    return self._validation[1]

  def sample_rows(self, drawn: Drawn, guidance: float) -> list[dict]:
    """`tradeoff.tradeoff_rows` of one scale's samples, with their CAS columns."""
    fid, pr = self.networks
    stats = distances.selection_stats(drawn.candidates.images, drawn.masks, fid, pr,
                                      self.opts, self.log)
    self.log("computing FID / IS / precision / recall")
    real = self.real_reference
    rows, notes = tradeoff.tradeoff_rows(
        stats, drawn.mean_scores, self.opts.num_images, real.ref, real.recon_ref,
        real.real_pr, self.opts, guidance=guidance,
        seconds=(drawn.candidates.seconds_per_image, drawn.score_seconds))
    self.log.note(*notes)
    tradeoff.attach_cas(rows, self.cas_accuracy, self.base_guidance)
    return rows
