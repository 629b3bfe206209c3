"""Codebook options beyond the paper (models/quantizer.py, CodebookOptions): k-means++ init
and factorised (low-dimensional) lookup, each checked against a NumPy reference or by its
gradients; the defaults keep the paper's quantizer and its variable layout; the removed
cosine distance still loads at its only value and fails clearly at any other."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_memory_levers import images, one_step, tiny_vqvae, vqvae_loss
from vqvae2_jax import builders, config_lib
from vqvae2_jax.models import quantizer as q
from vqvae2_jax.models.quantizer import CodebookOptions
from vqvae2_jax.models import vqvae as vqvae_lib


# ---------------------------------------------------------------- k-means++ init

def numpy_kmeans_plus_plus(uniforms, x, k, steps):
  """The reference: inverse-CDF k-means++ seeding with the given uniforms, then Lloyd."""
  x = x.astype(np.float64)

  def pick(weights, u):
    weights = weights if weights.sum() > 0 else np.ones_like(weights)
    cdf = np.cumsum(weights)
    return min(int(np.sum(cdf <= u * cdf[-1])), len(x) - 1)

  centres = [x[pick(np.ones(len(x)), uniforms[0])]]
  min_dist = ((x - centres[0])**2).sum(-1)
  for i in range(1, k):
    centres.append(x[pick(min_dist, uniforms[i])])
    min_dist = np.minimum(min_dist, ((x - centres[-1])**2).sum(-1))
  centres = np.stack(centres)
  for _ in range(steps):
    assign = np.argmin(((x[:, None] - centres[None])**2).sum(-1), -1)
    for j in range(k):
      if np.any(assign == j):
        centres[j] = x[assign == j].mean(0)
  return centres


@pytest.mark.parametrize("steps", [0, 3])
def test_kmeans_plus_plus_equals_numpy_with_the_same_draws(steps):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 3)).astype(np.float32)
  uniforms = np.asarray(jax.random.uniform(jax.random.PRNGKey(4), (10,)))
  got = q.kmeans_plus_plus(jnp.asarray(uniforms), jnp.asarray(x), 10, steps)
  np.testing.assert_allclose(got, numpy_kmeans_plus_plus(uniforms, x, 10, steps),
                             rtol=1e-5, atol=1e-6)


def clustered_batch(k=8, d=4, per=6, seed=2):
  """Encoder outputs [1, k, per, d] in k tight, far-apart clusters: k-means++ finds them
  whatever its draws, so the module's centres must be the clusters' means."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(k, d)) * 10
  z = means[:, None] + rng.normal(size=(k, per, d)) * 0.01
  return z[None].astype(np.float32), z.mean(1)


def test_kmeans_init_replaces_the_codebook_then_the_ema_starts_from_it():
  k, d, decay = 8, 4, 0.9
  z, cluster_means = clustered_batch(k, d)
  module = q.VectorQuantizerEMA(k, d, decay=decay,
                               options=CodebookOptions(codebook_init="kmeans"))
  variables = module.init(jax.random.PRNGKey(0), jnp.asarray(z), train=False)
  assert int(variables["vq_stats"]["initialized"]) == 0
  rngs = {"reseed": jax.random.PRNGKey(1)}
  apply = jax.jit(lambda v, z: module.apply(v, z, train=True, mutable=["vq_stats"],
                                            rngs=rngs))
  _, first = apply(variables, jnp.asarray(z))
  stats = first["vq_stats"]
  assert int(stats["initialized"]) == 1
  book = np.asarray(stats["codebook"])
  order = np.argmin(((cluster_means[:, None] - book[None])**2).sum(-1), -1)
  assert sorted(order) == list(range(k))  # one centre per cluster
  np.testing.assert_allclose(book[order], cluster_means, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["ema_sum"], book, rtol=0, atol=0)
  np.testing.assert_allclose(stats["ema_count"], np.ones(k), rtol=0, atol=0)
  # Second step: one ordinary EMA step from (ones, centres), no re-initialisation.
  z2 = z + np.float32(0.05)
  out, second = apply(first, jnp.asarray(z2))
  flat = z2.reshape(-1, d).astype(np.float64)
  codes = np.argmin(((flat[:, None] - book[None])**2).sum(-1), -1)
  np.testing.assert_array_equal(np.asarray(out.codes).reshape(-1), codes)
  count = decay + (1 - decay) * np.bincount(codes, minlength=k)
  sums = np.zeros((k, d))
  np.add.at(sums, codes, flat)
  total = decay * book + (1 - decay) * sums
  np.testing.assert_allclose(second["vq_stats"]["ema_count"], count, rtol=1e-5)
  np.testing.assert_allclose(second["vq_stats"]["ema_sum"], total, rtol=1e-5, atol=1e-5)
  assert int(second["vq_stats"]["initialized"]) == 1


def test_kmeans_init_is_mesh_global_under_a_sharded_batch():
  """With the batch sharded over 8 devices the centres are those of the whole batch."""
  k, d = 8, 4
  z, _ = clustered_batch(k, d, per=8)
  z = jnp.asarray(z.reshape(8, 1, 8, d))  # 8 rows, one per device
  module = q.VectorQuantizerEMA(k, d, options=CodebookOptions(codebook_init="kmeans"))
  variables = module.init(jax.random.PRNGKey(0), z, train=False)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(z, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  step = jax.jit(lambda v, z: module.apply(v, z, train=True, mutable=["vq_stats"],
                                           rngs={"reseed": jax.random.PRNGKey(1)})[1])
  chex.assert_trees_all_close(step(variables, sharded), step(variables, z), rtol=1e-6,
                              atol=1e-6)


def test_kmeans_init_deferred_equals_immediate_over_vqvae_steps():
  """Through the train step: the deferred path (vq_batch + finalize_codebooks) gives the
  same k-means-initialised codebooks and EMA as the immediate one."""
  model = tiny_vqvae(decay=0.9, codebook_options=CodebookOptions(codebook_init="kmeans"))
  batch = {"image": images(8)}
  variables = model.init(jax.random.PRNGKey(0), batch["image"], train=False)
  finalize = vqvae_lib.finalize_codebooks(model)
  whole, _ = one_step(vqvae_loss(model, False), variables, batch, 1)
  deferred, _ = one_step(vqvae_loss(model, True), variables, batch, 1, finalize)
  chex.assert_trees_all_close(deferred.model_state, whole.model_state, rtol=2e-5, atol=1e-5)
  accumulated, _ = one_step(vqvae_loss(model, True), variables, batch, 4, finalize)
  for state in (whole, accumulated):
    for level in ("quantizers_0", "quantizers_1"):
      stats = state.model_state["vq_stats"][level]
      assert int(stats["initialized"]) == 1
      assert np.all(np.isfinite(np.asarray(stats["codebook"])))
  moved = np.abs(np.asarray(whole.model_state["vq_stats"]["quantizers_1"]["codebook"])
                 - np.asarray(variables["vq_stats"]["quantizers_1"]["codebook"])).max()
  assert moved > 0.01


# ---------------------------------------------------------------- factorised lookup

def test_lookup_dim_shapes_and_gradients_reach_both_projections():
  k, d_model, d_low = 16, 8, 3
  module = q.VectorQuantizerEMA(k, d_model, options=CodebookOptions(lookup_dim=d_low))
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(size=(2, 4, 4, d_model)), jnp.float32)
  variables = module.init(jax.random.PRNGKey(0), z, train=False)
  chex.assert_shape(variables["vq_stats"]["codebook"], (k, d_low))
  chex.assert_shape(variables["params"]["project_in"]["kernel"], (d_model, d_low))
  chex.assert_shape(variables["params"]["project_out"]["kernel"], (d_low, d_model))
  out = module.apply(variables, z, train=False)
  chex.assert_shape(out.quantized, (2, 4, 4, d_model))
  chex.assert_shape(out.codes, (2, 4, 4))
  np.testing.assert_allclose(module.apply(variables, out.codes, method=module.lookup),
                             out.quantized, rtol=1e-6, atol=1e-6)
  target = jnp.asarray(rng.normal(size=(2, 4, 4, d_model)), jnp.float32)

  def loss(params, commitment_weight):
    o = module.apply({**variables, "params": params}, z, train=False)
    return jnp.mean((o.quantized - target)**2) + commitment_weight * o.commitment_loss

  for weight in (0.0, 1.0):  # the straight-through path alone already reaches project_in
    grads = jax.grad(loss)(variables["params"], weight)
    for name in ("project_in", "project_out"):
      assert float(jnp.abs(grads[name]["kernel"]).max()) > 1e-6, (name, weight)


def test_lookup_dim_search_and_ema_live_in_the_projection():
  """Codes are the nearest codebook rows to h = z W + b, and the EMA sums are sums of h."""
  k, d_model, d_low, decay = 6, 5, 2, 0.8
  module = q.VectorQuantizerEMA(k, d_model, decay=decay, options=CodebookOptions(lookup_dim=d_low))
  z = np.random.default_rng(4).normal(size=(2, 3, 3, d_model)).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(0), jnp.asarray(z), train=False)
  out, updates = module.apply(variables, jnp.asarray(z), train=True, mutable=["vq_stats"])
  dense = variables["params"]["project_in"]
  h = z.reshape(-1, d_model).astype(np.float64) @ np.asarray(dense["kernel"]) + dense["bias"]
  book = np.asarray(variables["vq_stats"]["codebook"], np.float64)
  codes = np.argmin(((h[:, None] - book[None])**2).sum(-1), -1)
  np.testing.assert_array_equal(np.asarray(out.codes).reshape(-1), codes)
  sums = np.zeros((k, d_low))
  np.add.at(sums, codes, h)
  np.testing.assert_allclose(updates["vq_stats"]["ema_sum"], decay * book + (1 - decay) * sums,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.commitment_loss, np.mean((book[codes] - h)**2), rtol=1e-5)


def test_vqvae_with_all_options_trains_a_step():
  model = tiny_vqvae(codebook_options=CodebookOptions(codebook_init="kmeans", lookup_dim=4))
  batch = {"image": images(4)}
  variables = model.init(jax.random.PRNGKey(0), batch["image"], train=False)
  chex.assert_shape(variables["vq_stats"]["quantizers_0"]["codebook"], (16, 4))
  out = model.apply(variables, batch["image"], train=False)
  chex.assert_shape(out.reconstruction, batch["image"].shape)
  state, metrics = one_step(vqvae_loss(model, False), variables, batch, 1)
  assert np.isfinite(float(metrics["loss"]))
  decoded = model.apply({"params": state.params, **state.model_state}, out.codes,
                        method=model.decode_codes)
  chex.assert_shape(decoded, batch["image"].shape)


# ---------------------------------------------------------------- defaults and config

def test_defaults_keep_the_paper_layout():
  variables = tiny_vqvae().init(jax.random.PRNGKey(0), images(2), train=False)
  assert set(variables["vq_stats"]["quantizers_0"]) == {"codebook", "ema_count", "ema_sum"}
  assert not any(name.startswith("quantizers") for name in variables["params"])


@pytest.mark.parametrize("field,value", [("codebook_init", "uniform"), ("lookup_dim", -1)])
def test_bad_codebook_options_are_clear_errors(field, value):
  config = config_lib.base_config()
  config.vqvae[field] = value
  with pytest.raises(ValueError, match=f"vqvae.{field}"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match=f"quantizer {field}"):
    q.VectorQuantizerEMA(4, 2, options=CodebookOptions(**{field: value})).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 2)), train=False)


def test_options_are_declared_once_and_reach_the_model_from_the_config():
  """The config's codebook fields are CodebookOptions' (plus the retired ones at their only
  value), and the builder hands the model exactly the options the config names."""
  config = config_lib.base_config()
  assert CodebookOptions.config_defaults() == {
      "codebook_init": "random", "lookup_dim": 0, "code_distance": "l2"}
  for key, value in CodebookOptions.config_defaults().items():
    assert config.vqvae[key] == value
  config.vqvae.lookup_dim, config.vqvae.codebook_init = 3, "kmeans"
  assert builders.build_vqvae(config).codebook_options == CodebookOptions("kmeans", 3)
  # A record written before the options existed gets the paper's quantizer.
  record = {k: v for k, v in config.vqvae.to_dict().items()
            if k not in CodebookOptions.config_defaults()}
  assert CodebookOptions.from_config(record) == CodebookOptions()


def test_removed_cosine_distance_loads_at_l2_and_fails_in_one_line_otherwise():
  config = config_lib.base_config()
  config.vqvae.code_distance = "l2"  # what every recorded stage-1 config holds
  config_lib.validate(config)
  assert builders.build_vqvae(config).codebook_options == CodebookOptions()
  config.vqvae.code_distance = "cosine"  # a workdir trained with the removed option
  for fails in (lambda: config_lib.validate(config), lambda: builders.build_vqvae(config)):
    with pytest.raises(ValueError) as error:
      fails()
    message = str(error.value)
    assert "\n" not in message and "vqvae.code_distance='cosine'" in message
    assert "removed" in message and "'l2'" in message and "version from before" in message


# ---------------------------------------------------------------- low-usage warning

def test_usage_warning_after_consecutive_low_logs_names_level_and_options(capsys):
  from vqvae2_jax.stages.vqvae_stage import UsageWarning  # pylint: disable=g-import-not-at-top
  watch = UsageWarning(("top", "bottom"), threshold=0.1, patience=3)
  rows = [[0.05, 0.5], [0.02, 0.05], [0.08, 0.5], [0.01, 0.04], [0.5, 0.03], [0.5, 0.02]]
  fired = [watch(50 * (i + 1), {"code_usage": u}) for i, u in enumerate(rows)]
  # top: low at logs 1-4 -> one warning at log 3; bottom: low at logs 4-6 -> at log 6.
  assert [len(f) for f in fired] == [0, 0, 1, 0, 0, 1]
  assert "level 'top'" in fired[2][0] and "step 150" in fired[2][0]
  assert "level 'bottom'" in fired[5][0]
  assert "dead_code_threshold" in fired[2][0] and "lookup_dim" in fired[2][0]
  assert "code_distance" not in fired[2][0]  # removed: it collapsed
  assert "level 'top'" in capsys.readouterr().out
  assert not watch(350, {"code_usage": [0.5, 0.01]})  # still low: no repeat
  assert not UsageWarning(("top",), threshold=0.0)(1, {"code_usage": [0.0]})
