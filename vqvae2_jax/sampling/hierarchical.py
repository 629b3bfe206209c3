"""Ancestral generation over the whole hierarchy (paper Algorithm 2, lines 10-14).

e_top ~ p_top(. | class), then each lower level e_l ~ p_l(. | e_above, class), then the
feed-forward decoder maps all levels to pixels. Batches are sharded over the mesh that
is ambient (`parallel.use_mesh`) when the sampler is made, so `generate` may be called
later without one: on many processes every process makes the same calls, each process's
devices draw their rows of every batch, and `generate` returns the whole batch on every
process.
Takes built modules and parameters (see `vqvae2_jax.api.Run.sampler`), never configs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import jax
import numpy as np

from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax import registry
from vqvae2_jax.sampling.incremental import sample_incremental
from vqvae2_jax.sampling.reference import has_incremental_loop, sample_reference


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """How codes are drawn: temperature > 0, top_k (0 = off), top_p in (0, 1] (1 = off),
  sampler 'incremental' (cached, exact) or 'reference' (one full pass per position),
  batch_size: images per device call (a multiple of the mesh size), guidance:
  classifier-free guidance scale w >= 0 for the class-conditional priors (1 = off; != 1
  needs them trained with label_dropout > 0, and costs two prior passes per sample)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  sampler: str = registry.INCREMENTAL
  batch_size: int = 16
  guidance: float = 1.0

  def __post_init__(self):
    if self.guidance < 0:
      raise ValueError(f"guidance={self.guidance} must be >= 0 (1 = off)")
    if self.sampler not in registry.SAMPLERS:
      raise ValueError(f"sampler={self.sampler!r}: use one of {registry.SAMPLERS}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size={self.batch_size} must be >= 1")


class HierarchicalSampler:
  """Generates images from stage 1 and one prior per level.

  Attributes:
    levels: level names, top first. shapes: {level: (H_l, W_l)}.
    num_classes: classes of the class-conditional priors (0 = unconditional).
  """

  def __init__(self, vqvae, vqvae_variables, priors: Mapping[str, tuple[Any, Any]],
               shapes: Mapping[str, tuple[int, int]], options: SampleOptions):
    """Args:
      vqvae, vqvae_variables: the stage-1 module and its variables.
      priors: level -> (PixelSNAILPrior, params), one per level of `shapes`.
      shapes: level -> (H_l, W_l), top first.
      options: SampleOptions.
    """
    self.levels = tuple(shapes)
    missing = [l for l in self.levels if l not in priors]
    if missing:
      raise ValueError(f"no prior for levels {missing}")
    self.shapes = {k: tuple(v) for k, v in shapes.items()}
    self.vqvae, self.vqvae_variables = vqvae, vqvae_variables
    self.priors, self.options = dict(priors), options
    self.num_classes = max(p.num_classes for p, _ in self.priors.values())
    parallel.check_batch_size(options.batch_size, "sample.batch_size")
    # Batches are split over the devices of the mesh ambient now.
    self.batch_sharding = parallel.batch_sharding()
    if options.guidance != 1.0:
      if not self.num_classes:
        raise ValueError(f"guidance={options.guidance} needs class-conditional priors; "
                         "these are unconditional: use guidance=1")
      for level, (p, _) in self.priors.items():
        if p.num_classes and not p.null_label:
          raise ValueError(f"guidance={options.guidance}: prior {level!r} was trained "
                           "without label_dropout (no null label); retrain it with "
                           f"priors.{level}.label_dropout > 0 or use guidance=1")
    self._decode = jax.jit(lambda v, codes: self.vqvae.apply(
        v, codes, method=self.vqvae.decode_codes))

  def sample_codes(self, rng: jax.Array, labels: np.ndarray | None, batch: int
                   ) -> dict[str, jax.Array]:
    """One batch of codes for every level, top first, each int32 [batch, H_l, W_l]."""
    o = self.options
    sharding = self.batch_sharding
    # Every process passes the same labels; the draw is one SPMD computation over all
    # devices of all processes, whose random bits do not depend on how it is split.
    labels_arr = (parallel.shared_to_global(np.asarray(labels, np.int32), sharding)
                  if labels is not None else None)
    codes = {}
    for i, level in enumerate(self.levels):
      prior, params = self.priors[level]
      kwargs = dict(shape=(batch, *self.shapes[level]),
                    cond_codes=tuple(codes[u] for u in self.levels[:i]),
                    labels=labels_arr if prior.num_classes else None,
                    temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                    guidance=o.guidance if prior.num_classes else 1.0)
      if o.sampler == registry.INCREMENTAL and has_incremental_loop(prior):
        codes[level] = sample_incremental(prior, params, jax.random.fold_in(rng, i),
                                          sharding=sharding, **kwargs)
      else:
        codes[level] = sample_reference(prior, params, jax.random.fold_in(rng, i), **kwargs)
    return codes

  def decode(self, codes: Mapping[str, jax.Array]) -> np.ndarray:
    """uint8 [B, H, W, 3] pixels of one batch of codes (a dict level -> int [B, H_l, W_l])."""
    pixels = self._decode(self.vqvae_variables, tuple(codes[l] for l in self.levels))
    return image_lib.to_uint8(parallel.global_to_host(pixels))

  def generate(self, n: int, labels: np.ndarray | None, seed: int, *,
               progress: bool = True) -> dict[str, np.ndarray]:
    """n images: {'image': uint8 [n,H,W,3], 'label': int32 [n], '<level>': int32 codes}.

    labels: int [n] classes for class-conditional priors (None when unconditional).
    Batch b uses the key fold_in(PRNGKey(seed), b), so a run is reproducible.
    """
    if self.num_classes and labels is None:
      raise ValueError("these priors are class-conditional: pass labels int [n]")
    batch = self.options.batch_size
    rng = jax.random.PRNGKey(seed)
    out = {k: [] for k in ("image", "label") + self.levels}
    start = time.time()
    for b, lo in enumerate(range(0, n, batch)):
      batch_labels = None
      if labels is not None:
        batch_labels = np.resize(np.asarray(labels[lo:lo + batch], np.int32), batch)
      codes = self.sample_codes(jax.random.fold_in(rng, b), batch_labels, batch)
      keep = min(batch, n - lo)
      out["image"].append(self.decode(codes)[:keep])
      out["label"].append((batch_labels if batch_labels is not None
                           else np.zeros(batch, np.int32))[:keep])
      for level in self.levels:
        out[level].append(parallel.global_to_host(codes[level])[:keep])
      if progress:
        done = lo + keep
        parallel.print0(f"[sample] {done}/{n} images "
                        f"({done / (time.time() - start):.2f} img/s)")
    return {k: np.concatenate(v) for k, v in out.items()}
