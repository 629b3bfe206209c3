"""EMA vector quantizer: nearest codes, EMA update by hand, straight-through gradient."""
import jax
import jax.extend  # noqa: F401  (jaxprs_in_params)
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.models import quantizer as q


def _variables(codebook, count=None):
  k = codebook.shape[0]
  count = np.ones(k, np.float32) if count is None else count
  return {"vq_stats": {"codebook": jnp.asarray(codebook), "ema_count": jnp.asarray(count),
                       "ema_sum": jnp.asarray(codebook * count[:, None])}}


def test_nearest_codes_matches_brute_force():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  codebook = rng.normal(size=(7, 5)).astype(np.float32)
  expected = np.argmin(((z[..., None, :] - codebook)**2).sum(-1), -1)
  np.testing.assert_array_equal(q.nearest_codes(jnp.asarray(z), jnp.asarray(codebook)), expected)
  np.testing.assert_allclose(q.lookup_codes(jnp.asarray(expected), jnp.asarray(codebook)),
                             codebook[expected], rtol=1e-6)


def test_ema_update_equals_numpy_reference():
  """Two EMA steps computed by hand with NumPy, Laplace smoothing included."""
  rng = np.random.default_rng(1)
  k, d, decay, eps = 6, 3, 0.9, 1e-5
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  module = q.VectorQuantizerEMA(k, d, decay=decay, epsilon=eps)
  variables = _variables(codebook)
  count, total, book = np.ones(k), codebook.astype(np.float64), codebook.astype(np.float64)
  for _ in range(2):
    z = rng.normal(size=(4, 2, 2, d)).astype(np.float32)
    out, updates = module.apply(variables, jnp.asarray(z), train=True, mutable=["vq_stats"])
    flat = z.reshape(-1, d).astype(np.float64)
    codes = np.argmin(((flat[:, None] - book[None])**2).sum(-1), -1)
    np.testing.assert_array_equal(np.asarray(out.codes).reshape(-1), codes)
    n = np.bincount(codes, minlength=k)
    sums = np.zeros((k, d))
    np.add.at(sums, codes, flat)
    count = decay * count + (1 - decay) * n
    total = decay * total + (1 - decay) * sums
    smoothed = (count + eps) / (count.sum() + k * eps) * count.sum()
    book = total / smoothed[:, None]
    stats = updates["vq_stats"]
    np.testing.assert_allclose(stats["ema_count"], count, rtol=1e-5)
    np.testing.assert_allclose(stats["ema_sum"], total, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["codebook"], book, rtol=1e-4, atol=1e-6)
    commitment = np.mean((book_before(variables)[codes] - flat)**2)
    np.testing.assert_allclose(out.commitment_loss, commitment, rtol=1e-5)
    variables = {"vq_stats": stats}
  # An unused code keeps a finite embedding (no division by zero).
  assert np.all(np.isfinite(np.asarray(variables["vq_stats"]["codebook"])))


def book_before(variables):
  return np.asarray(variables["vq_stats"]["codebook"], np.float64)


def test_unused_codes_stay_finite_with_zero_counts():
  k, d = 4, 2
  codebook = np.array([[0, 0], [10, 10], [20, 20], [30, 30]], np.float32)
  module = q.VectorQuantizerEMA(k, d, decay=0.5)
  variables = _variables(codebook, count=np.zeros(k, np.float32))
  z = jnp.zeros((1, 2, 2, d))
  _, updates = module.apply(variables, z, train=True, mutable=["vq_stats"])
  assert np.all(np.isfinite(np.asarray(updates["vq_stats"]["codebook"])))


def test_straight_through_gradient_is_identity():
  rng = np.random.default_rng(2)
  codebook = rng.normal(size=(5, 3)).astype(np.float32)
  module = q.VectorQuantizerEMA(5, 3)
  variables = _variables(codebook)
  z = jnp.asarray(rng.normal(size=(1, 2, 2, 3)).astype(np.float32))
  weights = jnp.asarray(rng.normal(size=(1, 2, 2, 3)).astype(np.float32))

  def f(z):
    out = module.apply(variables, z, train=False)
    return jnp.sum(out.quantized * weights)

  out = module.apply(variables, z, train=False)
  np.testing.assert_allclose(out.quantized, codebook[np.asarray(out.codes)], rtol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(z), weights, rtol=1e-6)
  # The commitment loss pulls z towards its code: gradient 2 (z - e) / N.
  g = jax.grad(lambda z: module.apply(variables, z, train=False).commitment_loss)(z)
  np.testing.assert_allclose(g, 2 * (z - out.quantized) / z.size, rtol=1e-5, atol=1e-7)


def test_perplexity_and_usage():
  codes = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  perplexity, usage = q.code_statistics(codes, 8)
  np.testing.assert_allclose(perplexity, 4.0, rtol=1e-5)
  np.testing.assert_allclose(usage, 0.5)


def test_dead_codes_are_reseeded_from_encoder_outputs():
  k, d = 4, 2
  codebook = np.array([[0, 0], [100, 100], [200, 200], [300, 300]], np.float32)
  module = q.VectorQuantizerEMA(k, d, decay=0.5, dead_code_threshold=0.9)
  variables = _variables(codebook)
  z = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 4, d)).astype(np.float32))
  _, updates = module.apply(variables, z, train=True, mutable=["vq_stats"],
                            rngs={"reseed": jax.random.PRNGKey(0)})
  book = np.asarray(updates["vq_stats"]["codebook"])
  flat = np.asarray(z).reshape(-1, d)
  for i in (1, 2, 3):  # unused codes had count 0.5 < 0.9: now equal to some encoder output
    assert np.min(np.abs(flat - book[i]).sum(-1)) < 1e-6


def test_wrong_code_dim_is_a_clear_error():
  module = q.VectorQuantizerEMA(4, 3)
  with pytest.raises(ValueError, match="last axis 3"):
    module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 5)), train=False)


def contractions(jaxpr):
  """Every dot_general / conv_general_dilated equation of a closed jaxpr, sub-jaxprs too."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        found.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  return found


def assert_all_highest(fn, *args, expect_at_least):
  """fn's contractions all run at Precision.HIGHEST (bf16 passes / TF32 are not exact)."""
  eqns = contractions(jax.make_jaxpr(fn)(*args))
  assert len(eqns) >= expect_at_least, [e.primitive.name for e in eqns]
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  for eqn in eqns:
    assert eqn.params["precision"] == highest, (
        f"{eqn.primitive.name} at precision {eqn.params['precision']}: the quantizer's "
        "distances, lookups and EMA sums must be exact float32 on every backend")


@pytest.mark.parametrize("threshold,options", [
    (0.0, {}), (0.5, {}), (0.0, {"codebook_init": "kmeans"}),
    (0.5, {"lookup_dim": 2, "codebook_init": "kmeans"})])
def test_quantizer_contractions_are_float32_exact(threshold, options):
  """Distances, one-hot lookup, EMA statistics (and the codebook options' k-means and
  projections) at HIGHEST, in every training mode."""
  k, d = 8, 4
  rng = np.random.default_rng(5)
  module = q.VectorQuantizerEMA(k, d, dead_code_threshold=threshold,
                                options=q.CodebookOptions(**options))
  z = jnp.asarray(rng.normal(size=(2, 3, 3, d)), jnp.bfloat16)  # bf16 encoder output
  variables = module.init(jax.random.PRNGKey(1), z, train=False)
  rngs = {"reseed": jax.random.PRNGKey(0)}
  for mutable in (["vq_stats"], ["vq_batch"]):
    # distances, lookup, EMA sums (the perplexity histogram is a sum, no contraction).
    assert_all_highest(lambda z: module.apply(variables, z, train=True, mutable=mutable,
                                              rngs=rngs), z, expect_at_least=3)
  assert_all_highest(lambda c: module.apply(variables, c, method=module.lookup),
                     jnp.zeros((2, 3), jnp.int32), expect_at_least=1)


def test_prior_one_hot_lookups_are_exact():
  """The prior's embedding, conditioning-code and label lookups select rows at HIGHEST."""
  from vqvae2_jax.models import prior_blocks  # pylint: disable=g-import-not-at-top
  idx = jnp.zeros((2, 3), jnp.int32)
  table = jnp.ones((5, 4))
  for dtype in (jnp.float32, jnp.bfloat16):
    assert_all_highest(lambda t: prior_blocks.one_hot_lookup(t, idx, dtype), table,
                       expect_at_least=1)
