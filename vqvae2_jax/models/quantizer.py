"""EMA vector quantizer (VQ-VAE, van den Oord et al. 2017; VQ-VAE-2 eq. 1-2).

The codebook is not trained by the optimizer: it lives in the `vq_stats` variable
collection and is updated by exponential moving averages of the per-code counts N_i
and sums m_i of the encoder outputs assigned to it (paper eq. after (2)):

  N_i <- gamma N_i + (1 - gamma) n_i,   m_i <- gamma m_i + (1 - gamma) sum_j E(x)_j,
  e_i = m_i / N~_i,  with N~ the Laplace-smoothed counts (N_i + eps) / (N + K eps) * N,

so a code that is never used keeps a finite embedding instead of dividing by zero.
The counts and sums are reductions over the *whole* batch array; under `jax.jit` with the
batch sharded over a mesh XLA inserts the cross-device sums, so the update is the one
of the global batch, exactly as on one device.

Two ways to train (both give the same update for the same batch):
  * immediate: apply with `mutable=['vq_stats']`; the EMA step of this batch is applied
    inside the call.
  * deferred (gradient accumulation): apply with `mutable=['vq_batch']`; the call only
    writes this batch's sums n_i, m_i (and re-seeding candidates) to the `vq_batch`
    collection. Microbatch sums add up to the whole batch's, and `commit_batch_statistics`
    then applies one EMA step with them, so an accumulated step sees the whole batch.

Codebook options (`CodebookOptions`, declared once here; all off by default, which is the
paper's quantizer and checkpoint layout):
  * codebook_init='kmeans': the quantizer keeps an `initialized` flag in 'vq_stats'. The first
    training call with the flag unset runs k-means++ and `kmeans_steps` Lloyd steps on the
    batch's encoder outputs (the whole jit-global array, so mesh-global) and that step's
    commit *replaces* codebook / ema_sum / ema_count by (centres, centres, ones) instead of
    an EMA step; the EMA starts from the centres at the next step. Under gradient
    accumulation the first microbatch's centres are used. The forward pass of that first
    step still quantizes with the random codebook (identically in both training modes).
  * lookup_dim=d > 0: factorised codes. A learned linear map projects z [.., D] to d, the
    search, codebook [K, d], EMA and commitment loss work in d, and a second learned map
    brings the (straight-through) code back to D. Gradients reach the input projection
    through the straight-through path and the commitment loss, the output one through the
    decoder.
A cosine (l2-normalised) codebook was measured and removed (`RETIRED_OPTIONS`): with this
encoder the search vectors' common direction grows without bound once their length no
longer matters, every vector ends up nearest the same code or two, with frozen codes as with
EMA ones (benchmarks/README.md, "Codebook options revisited").

Precision: every contraction here (distances, one-hot lookup, EMA sums) runs at
`Precision.HIGHEST`. JAX's default is bf16 passes on TPU and TF32 on Ampere/Hopper GPUs,
which flips a visible fraction of nearest-code assignments and rounds the "exact" rows of a
one-hot lookup; CPU is full float32 either way, so tests check the jaxpr instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

VQ_COLLECTION = "vq_stats"
VQ_BATCH_COLLECTION = "vq_batch"  # deferred per-batch sums (gradient accumulation)
EXACT = jax.lax.Precision.HIGHEST  # full float32 contractions on every backend
INITS = ("random", "kmeans")
# Options that were measured, lost and were removed: config key under `vqvae` -> (the only
# value still accepted, the paper's; why it went). Recorded configs keep loading with that
# value; any other value fails naming what to do.
RETIRED_OPTIONS = {
    "code_distance": ("l2", "cosine codebooks collapsed to a few codes and were removed "
                            "(benchmarks/README.md, 'Codebook options revisited')"),
}


@dataclasses.dataclass(frozen=True)
class CodebookOptions:
  """The quantizer's options beyond the paper, declared once: `VectorQuantizerEMA` and
  `VQVAE2` take one, the config's `vqvae` section holds these fields under the same names
  (`config_defaults`) and `from_config` builds one from it. Defaults are the paper's.

  codebook_init: 'random' (paper) | 'kmeans' (k-means++ on the first training batch;
    needs the 'reseed' rng in training).
  lookup_dim: 0 (paper) or d: search in a learned d-dimensional projection.
  """
  codebook_init: str = "random"
  lookup_dim: int = 0

  def problems(self) -> list[tuple[str, Any, str]]:
    """(field, value, why) of each value no quantizer runs with (empty when all are fine)."""
    found = []
    if self.codebook_init not in INITS:
      found.append(("codebook_init", self.codebook_init, f"must be one of {INITS}"))
    if self.lookup_dim < 0:
      found.append(("lookup_dim", self.lookup_dim,
                    "must be 0 (off) or a positive projection size"))
    return found

  @classmethod
  def config_defaults(cls) -> dict[str, Any]:
    """The `vqvae` config fields of the options (retired ones at their only value)."""
    return {**dataclasses.asdict(cls()),
            **{key: value for key, (value, _) in RETIRED_OPTIONS.items()}}

  @classmethod
  def config_problems(cls, section: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """`problems` of a `vqvae` config section, plus retired options set to another value."""
    found = [(key, section[key], f"{why}; train without it (the paper's {value!r}), or "
              "load a workdir trained with it using a version from before the removal "
              "(commit 9c14024)")
             for key, (value, why) in RETIRED_OPTIONS.items()
             if key in section and section[key] != value]
    return found + cls._from_section(section).problems()

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> CodebookOptions:
    """The options of a `vqvae` config section (a record that predates a field gets the
    paper's value). Raises ValueError naming the first field in `config_problems`."""
    found = cls.config_problems(section)
    if found:
      key, value, why = found[0]
      raise ValueError(f"config.vqvae.{key}={value!r}: {why}")
    return cls._from_section(section)

  @classmethod
  def _from_section(cls, section: Mapping[str, Any]) -> CodebookOptions:
    defaults = cls()
    return cls(**{f.name: type(getattr(defaults, f.name))(
        section.get(f.name, getattr(defaults, f.name))) for f in dataclasses.fields(cls)})


class QuantizerOutput(NamedTuple):
  """What `VectorQuantizerEMA` returns.

  quantized: float [B, H, W, D], straight-through (forward = codes' embeddings,
    backward = identity to the encoder output).
  codes: int32 [B, H, W], index of the nearest codebook vector.
  commitment_loss: float32 scalar, mean ||sg[e] - E(x)||^2 per element.
  perplexity: float32 scalar, exp(entropy) of the batch's code histogram.
  usage: float32 scalar, fraction of the K codes used at least once in the batch.
  """
  quantized: jax.Array
  codes: jax.Array
  commitment_loss: jax.Array
  perplexity: jax.Array
  usage: jax.Array


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest code by squared distance, computed in float32.

  Args:
    z: float [..., D] vectors to quantize.
    codebook: float [K, D].

  Returns:
    int32 [...] indices. Uses |z|^2 - 2 z.e + |e|^2 (one matmul, no [N, K, D] array).
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  distances = (jnp.sum(z**2, axis=-1, keepdims=True)
               - 2.0 * jnp.einsum("...d,kd->...k", z, codebook, precision=EXACT)
               + jnp.sum(codebook**2, axis=-1))
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def kmeans_plus_plus(uniforms: jax.Array, x: jax.Array, num_codes: int,
                     steps: int) -> jax.Array:
  """k-means++ seeding and `steps` Lloyd iterations on points x float32 [N, D].

  uniforms: float32 [K] in [0, 1): the i-th centre is the point at which the cumulative
    sum of the (squared-distance, or uniform for i = 0) weights first exceeds uniforms[i]
    times their total (inverse-CDF sampling, so a NumPy reference can reproduce the draw).
  Returns the centres float32 [K, D]. Lloyd steps move each centre to the mean of its
  points; a centre with no points keeps its place. With fewer distinct points than K the
  extra centres duplicate points (their distance weights are all zero -> uniform draw).
  """
  n = x.shape[0]

  def pick(weights, u):
    total = jnp.sum(weights)
    weights = jnp.where(total > 0, weights, jnp.ones_like(weights))
    cdf = jnp.cumsum(weights)
    return jnp.minimum(jnp.sum(cdf <= u * cdf[-1]), n - 1)

  first = x[pick(jnp.ones((n,), jnp.float32), uniforms[0])]
  centres = jnp.zeros((num_codes, x.shape[1]), jnp.float32).at[0].set(first)
  min_dist = jnp.sum((x - first)**2, axis=-1)

  def seed(i, carry):
    centres, min_dist = carry
    c = x[pick(min_dist, uniforms[i])]
    return centres.at[i].set(c), jnp.minimum(min_dist, jnp.sum((x - c)**2, axis=-1))

  centres, _ = jax.lax.fori_loop(1, num_codes, seed, (centres, min_dist))

  def lloyd(_, centres):
    count, total = batch_statistics(x, nearest_codes(x, centres), num_codes)
    return jnp.where(count[:, None] > 0, total / jnp.maximum(count, 1.0)[:, None], centres)

  return jax.lax.fori_loop(0, steps, lloyd, centres)


def lookup_codes(codes: jax.Array, codebook: jax.Array) -> jax.Array:
  """Embeddings of integer codes by one-hot matmul.

  A one-hot matmul instead of `codebook[codes]` keeps the lookup valid under any mesh
  axis type (a gather on a sharded operand can raise under Explicit sharding).

  Args:
    codes: int [...] indices in [0, K).
    codebook: float [K, D].

  Returns:
    float32 [..., D], the codebook rows exactly (HIGHEST precision: no bf16/TF32 rounding).
  """
  one_hot = jax.nn.one_hot(codes, codebook.shape[0], dtype=jnp.float32)
  return jnp.einsum("...k,kd->...d", one_hot, codebook.astype(jnp.float32), precision=EXACT)


def batch_statistics(z: jax.Array, codes: jax.Array, num_codes: int
                     ) -> tuple[jax.Array, jax.Array]:
  """Per-code counts n float32 [K] and sums m float32 [K, D] of z [..., D] by codes [...].

  Sums over the whole array, so the sums of disjoint microbatches add up to the batch's.
  """
  flat_z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  one_hot = jax.nn.one_hot(codes.reshape(-1), num_codes, dtype=jnp.float32)
  return jnp.sum(one_hot, axis=0), jnp.matmul(one_hot.T, flat_z, precision=EXACT)


def apply_ema(ema_count: jax.Array, ema_sum: jax.Array, batch_count: jax.Array,
              batch_sum: jax.Array, decay: float, epsilon: float
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One EMA step from batch sums: (count [K], sum [K, D]) -> (count, sum, codebook [K, D])."""
  num_codes = ema_count.shape[0]
  new_count = decay * ema_count + (1.0 - decay) * batch_count
  new_sum = decay * ema_sum + (1.0 - decay) * batch_sum
  total = jnp.sum(new_count)
  smoothed = (new_count + epsilon) / (total + num_codes * epsilon) * total
  return new_count, new_sum, new_sum / smoothed[:, None]


def ema_codebook_update(ema_count: jax.Array, ema_sum: jax.Array, z: jax.Array,
                        codes: jax.Array, decay: float, epsilon: float
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One EMA step of the codebook statistics.

  Args:
    ema_count: float32 [K] running counts N.
    ema_sum: float32 [K, D] running sums m.
    z: float [..., D] encoder outputs of the (global) batch.
    codes: int32 [...] their assigned codes.
    decay: gamma in (0, 1).
    epsilon: Laplace smoothing constant.

  Returns:
    (new_count [K], new_sum [K, D], new_codebook [K, D]).
  """
  batch_count, batch_sum = batch_statistics(z, codes, ema_count.shape[0])
  return apply_ema(ema_count, ema_sum, batch_count, batch_sum, decay, epsilon)


def code_statistics(codes: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
  """(perplexity, fraction of codes used) of a batch of int codes [...]."""
  counts = jnp.sum(jax.nn.one_hot(codes.reshape(-1), num_codes, dtype=jnp.float32), axis=0)
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10)))
  return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))


class VectorQuantizerEMA(nn.Module):
  """Vector quantizer with an EMA-updated codebook.

  Attributes:
    num_codes: K, codebook size.
    code_dim: D, codebook vector size (must equal the input's last axis).
    decay: EMA decay gamma.
    epsilon: Laplace smoothing of the counts.
    dead_code_threshold: if > 0, codes whose EMA count falls below it are re-seeded
      from random encoder outputs of the current batch (needs the 'reseed' rng in
      training). 0 turns re-seeding off (the paper's setting).
    options: the codebook options beyond the paper (`CodebookOptions`).
    kmeans_steps: Lloyd iterations after the k-means++ seeding.
  """
  num_codes: int
  code_dim: int
  decay: float = 0.99
  epsilon: float = 1e-5
  dead_code_threshold: float = 0.0
  options: CodebookOptions = CodebookOptions()
  kmeans_steps: int = 4

  @property
  def search_dim(self) -> int:
    """d of the codebook: lookup_dim when factorised, else code_dim."""
    return self.options.lookup_dim or self.code_dim

  def setup(self):
    for field, value, why in self.options.problems():
      raise ValueError(f"quantizer {field}={value!r}: {why}")
    # The initial codebook doubles as the initial EMA sum with unit counts, so the first
    # EMA steps start from it rather than from zero vectors.
    def init_codebook():
      rng = self.make_rng("params")
      return jax.random.uniform(rng, (self.num_codes, self.search_dim), jnp.float32,
                                -1.0, 1.0) / self.num_codes**0.5
    self.codebook = self.variable(VQ_COLLECTION, "codebook", init_codebook)
    self.ema_count = self.variable(VQ_COLLECTION, "ema_count", jnp.ones,
                                   (self.num_codes,), jnp.float32)
    self.ema_sum = self.variable(VQ_COLLECTION, "ema_sum", lambda: self.codebook.value)
    if self.options.codebook_init == "kmeans":  # only then: checkpoints keep their layout
      self.initialized = self.variable(VQ_COLLECTION, "initialized", jnp.zeros, (), jnp.int32)
    if self.options.lookup_dim:
      self.project_in = nn.Dense(self.options.lookup_dim, precision=EXACT, name="project_in")
      self.project_out = nn.Dense(self.code_dim, precision=EXACT, name="project_out")

  def _search_space(self, z: jax.Array) -> jax.Array:
    """float32 [..., D] -> [..., d] (projected when lookup_dim is set)."""
    return self.project_in(z) if self.options.lookup_dim else z

  def _output_space(self, h: jax.Array) -> jax.Array:
    """[..., d] -> float32 [..., D]."""
    return self.project_out(h) if self.options.lookup_dim else h

  def __call__(self, z: jax.Array, *, train: bool) -> QuantizerOutput:
    """Quantizes z: float [B, H, W, D]; when `train`, updates the codebook (immediate) or,
    if the 'vq_batch' collection is mutable, writes this batch's sums there (deferred)."""
    if z.shape[-1] != self.code_dim:
      raise ValueError(f"quantizer expects last axis {self.code_dim}, got shape {z.shape}")
    codebook = self.codebook.value
    z32 = self._search_space(z.astype(jnp.float32))
    codes = nearest_codes(z32, codebook)
    quantized = lookup_codes(codes, codebook)
    commitment = jnp.mean((jax.lax.stop_gradient(quantized) - z32)**2)
    if train and not self.is_initializing():
      stats = self._batch_statistics(jax.lax.stop_gradient(z32), codes)
      if self.is_mutable_collection(VQ_BATCH_COLLECTION):
        for name, value in stats.items():
          self.put_variable(VQ_BATCH_COLLECTION, name, value)
      else:
        self.commit_batch_statistics(jax.tree.map(lambda a: a[None], stats))
    perplexity, usage = code_statistics(codes, self.num_codes)
    straight_through = self._output_space(z32 + jax.lax.stop_gradient(quantized - z32))
    return QuantizerOutput(straight_through.astype(z.dtype), codes, commitment,
                           perplexity, usage)

  def _batch_statistics(self, z: jax.Array, codes: jax.Array) -> dict[str, jax.Array]:
    """{'count' [K], 'sum' [K, D]} of this batch, plus 'candidates' [K, D] (random encoder
    outputs of the batch, needs the 'reseed' rng) when dead codes are re-seeded."""
    count, total = batch_statistics(z, codes, self.num_codes)
    stats = {"count": count, "sum": total}
    if self.dead_code_threshold > 0:
      flat = z.reshape(-1, z.shape[-1])
      picks = jax.random.randint(self.make_rng("reseed"), (self.num_codes,), 0, flat.shape[0])
      stats["candidates"] = flat[picks]
    if self.options.codebook_init == "kmeans":  # centres only while uninitialised
      flat = z.reshape(-1, z.shape[-1])
      uniforms = jax.random.uniform(self.make_rng("reseed"), (self.num_codes,))
      stats["kmeans"] = jax.lax.cond(
          self.initialized.value > 0,
          lambda: jnp.zeros((self.num_codes, flat.shape[1]), jnp.float32),
          lambda: kmeans_plus_plus(uniforms, flat, self.num_codes, self.kmeans_steps))
    return stats

  def commit_batch_statistics(self, stats: dict[str, jax.Array]) -> None:
    """Applies one EMA step (and re-seeding) from microbatch statistics.

    stats: the 'vq_batch' entries of A equal-sized microbatches stacked on a leading axis:
      'count' [A, K], 'sum' [A, K, D] (summed here: the whole batch's sums) and, with
      re-seeding, 'candidates' [A, K, D], of which each dead code takes a uniformly chosen
      microbatch's (so a uniform draw over the whole batch; 'reseed' rng when A > 1);
      with codebook_init='kmeans', 'kmeans' [A, K, D] centres, the first microbatch's of which
      replace the statistics while the `initialized` flag is unset (no EMA step then).
    """
    count, total, codebook = apply_ema(
        self.ema_count.value, self.ema_sum.value, jnp.sum(stats["count"], axis=0),
        jnp.sum(stats["sum"], axis=0), self.decay, self.epsilon)
    if self.dead_code_threshold > 0:
      candidates = stats["candidates"]
      if candidates.shape[0] > 1:
        which = jax.random.randint(self.make_rng("reseed"), (self.num_codes,), 0,
                                   candidates.shape[0])
        candidates = candidates[which, jnp.arange(self.num_codes)]
      else:
        candidates = candidates[0]
      dead = count < self.dead_code_threshold
      codebook = jnp.where(dead[:, None], candidates, codebook)
      count = jnp.where(dead, 1.0, count)
      total = jnp.where(dead[:, None], codebook, total)
    if self.options.codebook_init == "kmeans":
      ready = self.initialized.value > 0
      centres = stats["kmeans"][0]
      count = jnp.where(ready, count, jnp.ones_like(count))
      total = jnp.where(ready, total, centres)
      codebook = jnp.where(ready, codebook, centres)
      self.initialized.value = jnp.ones_like(self.initialized.value)
    self.ema_count.value, self.ema_sum.value = count, total
    self.codebook.value = codebook

  def lookup(self, codes: jax.Array) -> jax.Array:
    """Embeddings float32 [..., D] of int codes [...] (what the forward pass outputs)."""
    return self._output_space(lookup_codes(codes, self.codebook.value))
