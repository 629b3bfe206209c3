"""Ancestral generation over the whole hierarchy (paper Algorithm 2, lines 10-14).

e_top ~ p_top(. | class), then each lower level e_l ~ p_l(. | e_above, class), then the
feed-forward decoder maps all levels to pixels. Batches are sharded over the mesh.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.sampling.incremental import sample_incremental
from vqvae2_jax.sampling.reference import sample_reference
from vqvae2_jax.stages import common


class HierarchicalSampler:
  """Loads stage 1 and every prior from a workdir and generates images.

  Attributes:
    levels: level names, top first. shapes: {level: (H_l, W_l)}.
    num_classes: classes of the class-conditional priors (0 = unconditional).
    class_names: names of those classes.
  """

  def __init__(self, config, workdir: str, mesh):
    self.config, self.mesh = config, mesh
    self.manifest = codes_lib.read_manifest(f"{workdir}/extract")
    self.levels = tuple(self.manifest["levels"])
    self.shapes = {k: tuple(v) for k, v in self.manifest["shapes"].items()}
    self.vqvae, self.vqvae_variables, _ = common.load_vqvae(config, workdir, mesh)
    self.priors = {level: common.load_prior(config, workdir, level, self.manifest, mesh)
                   for level in self.levels}
    self.num_classes = max(p.num_classes for p, _ in self.priors.values())
    self.class_names = list(self.manifest.get("class_names", []))
    self._decode = jax.jit(lambda v, codes: self.vqvae.apply(
        v, codes, method=self.vqvae.decode_codes))

  def default_labels(self, n: int) -> np.ndarray | None:
    """config.sample.labels cycled to n, or every class in turn; None if unconditional."""
    if not self.num_classes:
      return None
    chosen = tuple(self.config.sample.labels) or tuple(range(self.num_classes))
    bad = [c for c in chosen if not 0 <= c < self.num_classes]
    if bad:
      raise ValueError(f"sample.labels {bad} are not classes of this model "
                       f"(0..{self.num_classes - 1})")
    return np.resize(np.asarray(chosen, np.int32), n)

  def sample_codes(self, rng: jax.Array, labels: np.ndarray | None, batch: int
                   ) -> dict[str, jax.Array]:
    """One batch of codes for every level, top first, each int32 [batch, H_l, W_l]."""
    s = self.config.sample
    sampler = sample_incremental if s.sampler == "incremental" else sample_reference
    sharding = parallel.batch_sharding(self.mesh)
    labels_arr = (jax.device_put(jnp.asarray(labels, jnp.int32), sharding)
                  if labels is not None else None)
    codes = {}
    for i, level in enumerate(self.levels):
      prior, params = self.priors[level]
      kwargs = dict(shape=(batch, *self.shapes[level]),
                    cond_codes=tuple(codes[u] for u in self.levels[:i]),
                    labels=labels_arr if prior.num_classes else None,
                    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
      if sampler is sample_incremental:
        kwargs["sharding"] = sharding
      codes[level] = sampler(prior, params, jax.random.fold_in(rng, i), **kwargs)
    return codes

  def generate(self, n: int, labels: np.ndarray | None, seed: int, *,
               progress: bool = True) -> dict[str, np.ndarray]:
    """n images: {'image': uint8 [n,H,W,3], 'label': int32 [n], '<level>': int32 codes}."""
    batch = self.config.sample.batch_size
    parallel.check_batch_size(batch, self.mesh, "sample.batch_size")
    rng = jax.random.PRNGKey(seed)
    out = {k: [] for k in ("image", "label") + self.levels}
    start = time.time()
    for b, lo in enumerate(range(0, n, batch)):
      batch_labels = None
      if labels is not None:
        batch_labels = np.resize(labels[lo:lo + batch], batch)  # pad the last batch
      codes = self.sample_codes(jax.random.fold_in(rng, b), batch_labels, batch)
      pixels = self._decode(self.vqvae_variables, tuple(codes[l] for l in self.levels))
      keep = min(batch, n - lo)
      out["image"].append(image_lib.to_uint8(parallel.global_to_host(pixels))[:keep])
      out["label"].append((batch_labels if batch_labels is not None
                           else np.zeros(batch, np.int32))[:keep])
      for level in self.levels:
        out[level].append(parallel.global_to_host(codes[level])[:keep])
      if progress:
        done = lo + keep
        parallel.print0(f"[sample] {done}/{n} images "
                        f"({done / (time.time() - start):.2f} img/s)")
    return {k: np.concatenate(v) for k, v in out.items()}
