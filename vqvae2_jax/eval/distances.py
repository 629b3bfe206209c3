"""Sample distances: FID, FID*, Inception Score and precision/recall of image sets.

Images go through the feature networks block by block; each set (real images,
reconstructions, the samples accepted at one keep fraction) keeps only float64 feature
moments, logits for the Inception Score and a fixed random subsample of feature rows for
precision/recall (`SetStats`), so 50k-image sets fit in memory. FID is
`metrics.frechet_distance` ('eigh' by default; 'sqrtm' is pytorch-fid's computation).
The real images' statistics are cached between runs (`ReferenceCache`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import numpy as np

from vqvae2_jax import parallel
from vqvae2_jax import registry
from vqvae2_jax import storage
from vqvae2_jax.eval import feature_networks as features_lib
from vqvae2_jax.eval import metrics
from vqvae2_jax.eval.options import EvalOptions


@dataclasses.dataclass
class Network:
  """A loaded feature network: apply_fn(variables, uint8 [B, H, W, 3]) -> dict of outputs.

  info: what `feature_networks.load_feature_network` returns (feature_key, logits_key...).
  """
  name: str
  apply_fn: Callable[..., Any]
  variables: Any
  info: dict

  @property
  def label(self) -> str:
    """The network's name, flagged when its figures are not comparable with papers."""
    if self.info["comparable_with_published"]:
      return self.name
    return f"{self.name} (NOT comparable with published numbers)"


def load_network(name: str, path: str, log=print) -> tuple[Network | None, list[str]]:
  """(network `name` from `path`, notes). From `path` it must load (errors propagate);
  for path '' it comes from the default search, None plus a note when absent or
  unreadable."""
  try:
    apply_fn, variables, info = features_lib.load_feature_network(name, path or None)
  except (FileNotFoundError, ImportError, ValueError) as e:
    if path:
      raise
    return None, [f"{name} feature network unavailable: {str(e).splitlines()[0][:240]}"]
  # Replicated once: extract_features would otherwise copy the weights for every block.
  variables = jax.device_put(variables, parallel.replicated())
  log(f"loaded {name} weights from {info['weights_path']}")
  return Network(name, apply_fn, variables, info), []


def resolve_networks(opts: EvalOptions, log=print
                     ) -> tuple[Network | None, Network | None, list[str]]:
  """(network for FID / IS / FID*, network for precision/recall, notes).

  Inception and VGG-16 when their weights are found; otherwise opts.fallback_network
  ('efficientnet_lite0' or 'none') stands in, with a note that the numbers are not
  comparable with published ones.
  """
  fid, notes = load_network("inception", opts.inception_weights, log)
  pr, more = load_network("vgg16", opts.vgg16_weights, log)
  notes += more
  fallback = None
  if (fid is None or pr is None) and opts.fallback_network == registry.EFFICIENTNET_LITE0:
    fallback, more = load_network(registry.EFFICIENTNET_LITE0, opts.efficientnet_weights, log)
    notes += more
  if fid is None and fallback is not None:
    fid = fallback
    notes.append("FID / IS / FID* use EfficientNet-Lite0 features (1280-d) and its ImageNet "
                 "logits in place of Inception: NOT comparable with published FID / IS.")
  if pr is None:
    pr = fallback or fid
    if pr is not None:
      notes.append(f"precision/recall use {pr.name} features in place of VGG-16 fc2: NOT "
                   "comparable with published precision/recall.")
  return fid, pr, notes


def net_outputs(fid: Network | None, pr: Network | None, images: np.ndarray, batch: int
                ) -> dict[str, np.ndarray]:
  """{'fid': [n, D], 'logits': [n, C], 'pr': [n, D']} of uint8 images [n, H, W, 3]."""
  out = {}
  for net, role in ((fid, "fid"), (pr, "pr")):
    if net is None or not len(images):
      continue
    if role == "pr" and net is fid:
      out["pr"] = out["fid"]
      continue
    keys = [net.info["feature_key"]] + (
        [net.info["logits_key"]] if role == "fid" and net.info["logits_key"] else [])
    r = features_lib.extract_features(net.apply_fn, net.variables, [images], batch_size=batch,
                                      keep=keys)
    out[role] = r.features[keys[0]].reshape(len(images), -1)
    if len(keys) > 1:
      out["logits"] = r.features[keys[1]].reshape(len(images), -1)
  return out


class SetStats:
  """What one image set keeps: feature moments, logits, a subsample of feature rows."""

  def __init__(self, expected: int, pr_max: int, seed: int):
    """expected: images the set will receive; pr_max: feature rows kept (0 = all)."""
    self.moments, self.logits, self.pr, self.count = None, [], [], 0
    # Raw FID features while the set has no more rows than dimensions: its covariance is
    # then low-rank and the Frechet distance is computed in that small subspace.
    self._rows: list[np.ndarray] | None = []
    keep = np.ones(max(expected, 0), bool)
    if 0 < pr_max < expected:  # a fixed random subset, chosen before the data arrives
      keep[:] = False
      keep[np.random.default_rng(seed).choice(expected, pr_max, replace=False)] = True
    self._pr_keep = keep

  def update(self, out: dict[str, np.ndarray]) -> None:
    """Adds a block of `net_outputs`."""
    if not out:
      return
    n = len(next(iter(out.values())))
    if "fid" in out:
      dim = out["fid"].shape[1]
      self.moments = self.moments or metrics.StreamingMoments(dim)
      self.moments.update(out["fid"])
      if self._rows is not None and self.count + n <= dim:
        self._rows.append(np.asarray(out["fid"], np.float64))
      else:
        self._rows = None
    if "logits" in out:
      self.logits.append(np.asarray(out["logits"], np.float32))
    if "pr" in out:
      self.pr.append(np.asarray(out["pr"], np.float32)[self._pr_keep[self.count:self.count + n]])
    self.count += n

  def pr_features(self) -> np.ndarray | None:
    """float32 [<= pr_max, D'] feature rows kept for precision/recall, or None."""
    return np.concatenate(self.pr) if self.pr else None

  def covariance_factor(self) -> np.ndarray | None:
    """F float64 [n, D] with F^T F == the covariance, while n <= D; else None."""
    if not self._rows or self.count < 2:
      return None
    x = np.concatenate(self._rows)
    return (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)


def fid_between(a: SetStats, b_stats, what: str, method: str = registry.FID_EIGH
                ) -> tuple[float | None, list[str]]:
  """(FID of set `a` against (mu, sigma) `b_stats`, notes): None and a note naming `what`
  when not computable."""
  if a.moments is None or b_stats is None:
    return None, []
  stats = a.moments.stats()  # raises eval.metrics' error for a set of < 2 images
  factor = a.covariance_factor() if method == registry.FID_EIGH else None
  try:
    return metrics.frechet_distance(*stats, *b_stats, method=method, factor1=factor), []
  except (ValueError, np.linalg.LinAlgError) as err:
    return None, [f"{what}: not computable ({err})"]


def set_metrics(s: SetStats, ref, recon_ref, real_pr, opts: EvalOptions, what: str
                ) -> tuple[dict, list[str]]:
  """(row, notes): FID (vs `ref`), FID* (vs `recon_ref`), Inception Score and
  precision/recall (vs the real feature rows `real_pr`) of one sample set."""
  fid, notes = fid_between(s, ref, f"FID of {what}", opts.fid_method)
  fid_star, more = fid_between(s, recon_ref, f"FID* of {what}", opts.fid_method)
  notes += more
  row = {"num_images": s.count, "fid": fid, "fid_star": fid_star}
  if s.logits:
    logits = np.concatenate(s.logits)
    row["is_splits"] = min(opts.is_splits, len(logits))
    row["is_mean"], row["is_std"] = metrics.inception_score(logits, row["is_splits"])
  fake = s.pr_features()
  if real_pr is not None and fake is not None:
    if min(len(real_pr), len(fake)) > opts.pr_k:
      row["precision"], row["recall"] = metrics.precision_recall(real_pr, fake, k=opts.pr_k)
      row["pr_num_real"], row["pr_num_fake"] = len(real_pr), len(fake)
    else:
      notes.append(f"precision/recall of {what}: needs more than k={opts.pr_k} images per set")
  return row, notes


def selection_stats(images: np.ndarray, masks: dict[float, np.ndarray], fid: Network | None,
                    pr: Network | None, opts: EvalOptions, log=print
                    ) -> dict[float, SetStats]:
  """SetStats of each selection: images uint8 [M, S, S, 3] (a memmap is read in blocks),
  masks keep fraction -> bool [M]. Each image's features are computed once."""
  stats = {f: SetStats(int(m.sum()), opts.pr_max_images, opts.seed) for f, m in masks.items()}
  any_mask = np.any(np.stack(list(masks.values())), axis=0)
  total, done, start = int(any_mask.sum()), 0, time.time()
  block = opts.batch_size * max(1, 256 // opts.batch_size)
  for lo in range(0, len(images), block):
    sel = any_mask[lo:lo + block]
    if not sel.any():
      continue
    out = net_outputs(fid, pr, np.asarray(images[lo:lo + block])[sel], opts.batch_size)
    for f, m in masks.items():
      rows = m[lo:lo + block][sel]
      if rows.any():
        stats[f].update({k: v[rows] for k, v in out.items()})
    done += int(sel.sum())
    log(f"sample features {done}/{total} ({done / (time.time() - start):.1f} img/s)")
  return stats


class ReferenceCache:
  """Cached statistics of the real images for one network, valid for one `key`.

  role 'fid': feature moments in <directory>/ref_stats_<net>.npz (pytorch-fid's format);
  role 'pr': feature rows in ref_pr_<net>.npz. A .json beside each holds the key (data,
  weights' SHA-256, pr_max_images); a different key means the cache is stale.
  """

  def __init__(self, directory: str, net: Network, role: str, key: dict):
    self.stem = storage.join(directory,
                             f"ref_{'stats' if role == 'fid' else 'pr'}_{net.name}")
    self.role, self.key = role, key

  def load(self):
    """(mu, sigma) for 'fid', feature rows [n, D] for 'pr'; None when absent or stale."""
    try:
      if json.loads(storage.read_text(self.stem + ".json")) != self.key:
        return None
      if self.role == "fid":
        return metrics.load_stats(self.stem + ".npz")
      with storage.open(self.stem + ".npz", "rb") as f, np.load(f) as data:
        return data["features"]
    except (OSError, ValueError, KeyError):
      return None

  def save(self, value) -> None:
    """Writes (mu, sigma) or feature rows, then the key (process 0 only)."""
    if not parallel.is_main_process():
      return
    if self.role == "fid":
      metrics.save_stats(self.stem + ".npz", *value)
    else:
      with storage.open(self.stem + ".npz", "wb") as f:
        np.savez(f, features=value)
    storage.write_text(self.stem + ".json", json.dumps(self.key))



class RealReference:
  """The real side of every distance, filled by one `validation_pass` (a consumer).

  ref (mu, sigma) and real_pr (feature rows) of the original images come from their
  `ReferenceCache` when its key matches, else they are computed in the pass and cached
  by `finish`; recon_ref (mu, sigma) of the reconstructions is computed each time (FID*
  and the FID of reconstructions).
  """

  def __init__(self, fid: Network | None, pr: Network | None, expected: int,
               opts: EvalOptions, cache_dir: str, data_key: dict):
    """expected: images the pass will feed; data_key: what identifies those images
    (source, split, size, count) in the cache key, beside the weights and pr_max."""
    self.fid, self.pr, self.opts = fid, pr, opts
    self.caches = {role: ReferenceCache(cache_dir, net, role, dict(
        data_key, weights=net.info["source_sha256"], pr_max=opts.pr_max_images))
                   for net, role in ((fid, "fid"), (pr, "pr")) if net is not None}
    cached = {role: c.load() for role, c in self.caches.items()}
    self.ref, self.real_pr, self.recon_ref = cached.get("fid"), cached.get("pr"), None
    # Every process must agree, or only some would feed the pass's feature networks.
    self.need_real = parallel.any_process(any(v is None for v in cached.values()))
    self.real = SetStats(expected, opts.pr_max_images, opts.seed)
    self.recon = SetStats(expected, 0, opts.seed)

  def update(self, originals: np.ndarray, reconstructions: np.ndarray, labels) -> None:
    """uint8 [n, S, S, 3] originals and reconstructions of one batch (labels unused)."""
    del labels
    b = self.opts.batch_size
    if self.need_real:
      self.real.update(net_outputs(self.fid, self.pr, originals, b))
    self.recon.update(net_outputs(self.fid, None, reconstructions, b))

  def finish(self, log=print) -> None:
    """After the pass: the statistics computed, the caches written."""
    if self.need_real and self.real.moments is not None:
      self.ref = self.real.moments.stats()
      self.caches["fid"].save(self.ref)
      log(f"cached reference statistics to {self.caches['fid'].stem}.npz")
    if self.need_real and self.real.pr_features() is not None:
      self.real_pr = self.real.pr_features()
      self.caches["pr"].save(self.real_pr)
    if self.recon.moments is not None:
      self.recon_ref = self.recon.moments.stats()

  def reconstruction_metrics(self) -> tuple[dict, list[str]]:
    """({'fid': FID of the reconstructions against the originals, 'num_images'}, notes)."""
    fid, notes = fid_between(self.recon, self.ref, "FID of reconstructions",
                             self.opts.fid_method)
    return {"fid": fid, "num_images": self.recon.count}, notes
