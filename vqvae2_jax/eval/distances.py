"""Streaming feature statistics of image sets, and the sample metrics computed from them.

The evaluate stage pushes images through the feature networks block by block; each set
(real images, reconstructions, the samples accepted at one keep fraction) keeps only
float64 feature moments, logits for the Inception Score and a fixed random subsample of
feature rows for precision/recall, so 50k-image sets fit in memory.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vqvae2_jax.eval import feature_networks as features_lib
from vqvae2_jax.eval import metrics


@dataclasses.dataclass
class Network:
  """A loaded feature network: apply_fn(variables, uint8 [B, H, W, 3]) -> dict of outputs.

  info: what `features.load_feature_network` returns (feature_key, logits_key, ...).
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


def load_network(name: str, path: str, mesh, notes: list[str], log=print) -> Network | None:
  """Network `name` from `path` (must load: errors propagate) or, for path '', from the
  default search (None plus a note when absent or unreadable)."""
  try:
    apply_fn, variables, info = features_lib.load_feature_network(name, path or None)
  except (FileNotFoundError, ImportError, ValueError) as e:
    if path:
      raise
    notes.append(f"{name} feature network unavailable: {str(e).splitlines()[0][:240]}")
    return None
  # Replicated once: extract_features would otherwise copy the weights for every block.
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  log(f"loaded {name} weights from {info['weights_path']}")
  return Network(name, apply_fn, variables, info)


def resolve_networks(e, mesh, notes: list[str], log=print
                     ) -> tuple[Network | None, Network | None]:
  """(network for FID / IS / FID*, network for precision/recall) from config.evaluate `e`.

  Inception and VGG-16 when their weights are found; otherwise e.fallback_network
  ('efficientnet_lite0' or 'none') stands in, with a note that the numbers are not
  comparable with published ones.
  """
  if e.fallback_network not in ("efficientnet_lite0", "none", ""):
    raise ValueError(f"config.evaluate.fallback_network={e.fallback_network!r}: use "
                     "'efficientnet_lite0' or 'none'")
  fid = load_network("inception", e.inception_weights, mesh, notes, log)
  pr = load_network("vgg16", e.vgg16_weights, mesh, notes, log)
  fallback = None
  if (fid is None or pr is None) and e.fallback_network == "efficientnet_lite0":
    fallback = load_network("efficientnet_lite0", e.efficientnet_weights, mesh, notes, log)
  if fid is None and fallback is not None:
    fid = fallback
    notes.append("FID / IS / FID* use EfficientNet-Lite0 features (1280-d) and its ImageNet "
                 "logits in place of Inception: NOT comparable with published FID / IS.")
  if pr is None:
    pr = fallback or fid
    if pr is not None:
      notes.append(f"precision/recall use {pr.name} features in place of VGG-16 fc2: NOT "
                   "comparable with published precision/recall.")
  return fid, pr


def net_outputs(fid: Network | None, pr: Network | None, images: np.ndarray, batch: int,
                mesh) -> dict[str, np.ndarray]:
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
                                      mesh=mesh, keep=keys)
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


def frechet_distance(mu1, sigma1, mu2, sigma2, factor1: np.ndarray | None = None) -> float:
  """The Frechet distance of metrics.frechet_distance, with Tr((sigma1 sigma2)^1/2) taken
  from eigenvalues instead of scipy's sqrtm.

  sigma1 sigma2 has the nonzero eigenvalues of the symmetric PSD matrix A = R^T sigma2 R
  for any R with R R^T = sigma1 (its Cholesky factor, its eigen square root when singular,
  or factor1^T when given: factor1 [n, D] with factor1^T factor1 == sigma1, which makes A
  only n x n), so the trace is sum_i sqrt(lambda_i(A)). Equal to the sqrtm form to ~1e-8
  relative, and 10-30x faster for 2048-d features on a CPU.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(f"statistics do not match: {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
  if factor1 is not None:
    r = np.asarray(factor1, np.float64).T
  else:
    try:
      r = np.linalg.cholesky(s1)
    except np.linalg.LinAlgError:  # singular (fewer images than dimensions)
      w, v = np.linalg.eigh(s1)
      r = v * np.sqrt(np.clip(w, 0.0, None))
  a = r.T @ s2 @ r
  lam = np.linalg.eigvalsh((a + a.T) / 2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2)
               - 2.0 * np.sqrt(np.clip(lam, 0.0, None)).sum())


def fid_between(a: SetStats, b_stats, notes: list[str], what: str, method: str = "eigh"):
  """FID of set `a` against (mu, sigma) `b_stats`; None (+ a note) when not computable."""
  if a.moments is None or b_stats is None:
    return None
  stats = a.moments.stats()  # raises eval.metrics' error for a set of < 2 images
  try:
    if method == "sqrtm":
      return metrics.frechet_distance(*stats, *b_stats)
    return frechet_distance(*stats, *b_stats, factor1=a.covariance_factor())
  except (ValueError, np.linalg.LinAlgError) as err:
    notes.append(f"{what}: not computable ({err})")
    return None


def set_metrics(s: SetStats, ref, recon_ref, real_pr, e, notes: list[str], what: str) -> dict:
  """FID, FID*, Inception Score and precision/recall of one sample set (config.evaluate e)."""
  row = {"num_images": s.count,
         "fid": fid_between(s, ref, notes, f"FID of {what}", e.fid_method),
         "fid_star": fid_between(s, recon_ref, notes, f"FID* of {what}", e.fid_method)}
  if s.logits:
    logits = np.concatenate(s.logits)
    row["is_splits"] = min(e.is_splits, len(logits))
    row["is_mean"], row["is_std"] = metrics.inception_score(logits, row["is_splits"])
  fake = s.pr_features()
  if real_pr is not None and fake is not None:
    if min(len(real_pr), len(fake)) > e.pr_k:
      row["precision"], row["recall"] = metrics.precision_recall(real_pr, fake, k=e.pr_k)
      row["pr_num_real"], row["pr_num_fake"] = len(real_pr), len(fake)
    else:
      notes.append(f"precision/recall of {what}: needs more than k={e.pr_k} images per set")
  return row
