"""Classifier-free guidance: label dropout in training, guided sampling in both samplers."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vqvae2_jax import builders, config_lib
from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.sampling import draw as draw_lib
from vqvae2_jax.sampling import incremental
from vqvae2_jax.sampling.hierarchical import SampleOptions
from vqvae2_jax.sampling.incremental import run_incremental, sample_incremental
from vqvae2_jax.sampling.reference import sample_reference

from helpers import numpy_params

K, CLASSES = 8, 3
# A bottom-like prior (one upper level, one attention layer, classes) with a null label.
MODEL = dict(num_codes=K, hidden=16, res_hidden=16, num_layers=2, attention_every=2,
             num_heads=2, num_cond_layers=1, num_cond_levels=1, cond_scales=(2,),
             num_classes=CLASSES, null_label=True)
B, H, W = 4, 6, 6
SAMPLE = dict(temperature=0.9, top_k=6, top_p=0.95)


def _manifest():
  return dict(levels=["top", "bottom"], shapes={"top": [4, 4], "bottom": [8, 8]},
              num_codes=K, num_classes=CLASSES)


def _shapes(prior):
  variables = jax.eval_shape(builders.prior_init_fn(prior, _manifest(), "bottom"),
                             jax.random.key(0))
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape for path, leaf in
          jax.tree_util.tree_flatten_with_path(
              jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                           variables["params"], is_leaf=lambda x: hasattr(x, "unbox")))[0]}


# ---- training side ----

def test_label_dropout_zero_keeps_the_params_tree():
  config = config_lib.base_config()
  defaults = config_lib.prior_config(hidden=16, res_hidden=16, num_layers=2, num_heads=2,
                                     attention_every=2, num_cond_layers=1)
  assert defaults.label_dropout == 0.0 and config.sample.guidance == 1.0
  config.priors = dict(bottom=defaults)
  off = builders.build_prior(config, "bottom", _manifest())
  assert not off.null_label and off.label_dropout == 0.0
  # The module exactly as it was built before label_dropout existed.
  before = PixelSNAILPrior(num_codes=K, hidden=16, res_hidden=16, num_layers=2,
                           attention_every=2, num_heads=2, num_cond_layers=1,
                           num_cond_levels=1, cond_scales=(2,), num_classes=CLASSES)
  assert _shapes(off) == _shapes(before)
  assert _shapes(off)["label_embedding"] == (CLASSES, 16)

  config.priors.bottom.label_dropout = 0.1
  config_lib.validate(config)
  on = builders.build_prior(config, "bottom", _manifest())
  assert on.null_label and on.label_dropout == 0.1
  on_shapes, off_shapes = _shapes(on), _shapes(off)
  assert on_shapes.pop("label_embedding") == (CLASSES + 1, 16)
  off_shapes.pop("label_embedding")
  assert on_shapes == off_shapes  # the null row is the only new parameter


def test_label_dropout_config_errors():
  config = config_lib.base_config()
  config.priors = dict(bottom=config_lib.prior_config(label_dropout=1.0))
  with pytest.raises(ValueError, match="label_dropout"):
    config_lib.validate(config)
  config.priors = dict(bottom=config_lib.prior_config(label_dropout=0.1,
                                                      class_conditional=False))
  with pytest.raises(ValueError, match="class_conditional"):
    config_lib.validate(config)
  config.priors = dict(bottom=config_lib.prior_config())
  config.sample.guidance = -1.0
  with pytest.raises(ValueError, match="sample.guidance"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="null_label"):
    _init(PixelSNAILPrior(**dict(MODEL, null_label=False, label_dropout=0.1)))


def _inputs(b=B, seed=1):
  rng = np.random.default_rng(seed)
  codes = jnp.asarray(rng.integers(0, K, (b, H, W)), jnp.int32)
  cond = (jnp.asarray(rng.integers(0, K, (b, H // 2, W // 2)), jnp.int32),)
  labels = jnp.asarray(rng.integers(0, CLASSES, (b,)), jnp.int32)
  return codes, cond, labels


def _init(model, b=B):
  codes, cond, labels = _inputs(b)
  return numpy_params(model, codes, cond, labels)


def test_null_row_receives_gradient_only_in_training():
  model = PixelSNAILPrior(**dict(MODEL, label_dropout=0.5))
  params = _init(model)
  codes, cond, labels = _inputs()

  def null_row_grad(train):
    def loss(p):
      logits = model.apply({"params": p}, codes, cond, labels, train=train,
                           rngs={"dropout": jax.random.key(3)})
      return jax.nn.logsumexp(logits, -1).mean() - logits[..., 0].mean()
    g = jax.grad(loss)(params)["label_embedding"]
    return np.abs(np.asarray(g[CLASSES])).sum(), np.abs(np.asarray(g[:CLASSES])).sum()

  null_train, classes_train = null_row_grad(True)
  null_eval, classes_eval = null_row_grad(False)
  assert null_train > 0 and classes_eval > 0
  assert null_eval == 0.0  # evaluation never drops labels


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_label_dropout_rate_is_respected(rate):
  # conditioning() of an unconditioned-on-codes prior is the label embedding itself, so
  # each row shows which label it used.
  model = PixelSNAILPrior(num_codes=K, hidden=8, res_hidden=8, num_layers=1,
                          num_classes=CLASSES, null_label=True, label_dropout=rate)
  n = 20_000
  labels = jnp.asarray(np.arange(n) % CLASSES, jnp.int32)
  params = numpy_params(model, jnp.zeros((1, 2, 2), jnp.int32), (), labels[:1])
  c = model.apply({"params": params}, (), labels, (n, 1, 1), train=True,
                  method=PixelSNAILPrior.conditioning, rngs={"dropout": jax.random.key(5)})
  rows = np.asarray(c[:, 0, 0])
  table = np.asarray(params["label_embedding"])
  used = np.argmin(((rows[:, None] - table[None]) ** 2).sum(-1), axis=1)
  dropped = used == CLASSES
  np.testing.assert_array_equal(used[~dropped], np.asarray(labels)[~dropped])
  sigma = np.sqrt(rate * (1 - rate) / n)
  assert abs(dropped.mean() - rate) < 5 * sigma, (dropped.mean(), rate)
  for y in range(CLASSES):  # independent of the class
    assert abs(dropped[np.asarray(labels) == y].mean() - rate) < 5 * sigma * np.sqrt(CLASSES)
  again = model.apply({"params": params}, (), labels, (n, 1, 1), train=False,
                      method=PixelSNAILPrior.conditioning)
  np.testing.assert_array_equal(np.asarray(again[:, 0, 0]), table[np.asarray(labels)])


# ---- sampling side ----

@functools.lru_cache(maxsize=None)
def _case():
  model = PixelSNAILPrior(**dict(MODEL, label_dropout=0.1))
  params = _init(model)
  _, cond, labels = _inputs()
  return model, params, cond, labels


def _kw(guidance, **over):
  model, params, cond, labels = _case()
  return dict(dict(shape=(B, H, W), cond_codes=cond, labels=labels, guidance=guidance,
                   **SAMPLE), **over)


@functools.lru_cache(maxsize=None)
def _sampled(guidance):
  model, params, _, _ = _case()
  key = jax.random.key(11)
  ref = sample_reference(model, params, key, **_kw(guidance))
  inc, logits = sample_incremental(model, params, key, return_logits=True, **_kw(guidance))
  return np.asarray(ref), np.asarray(inc), np.asarray(logits)


def test_guidance_one_is_plain_conditional_sampling_bit_exact():
  model, params, _, _ = _case()
  key = jax.random.key(11)
  plain_kw = _kw(1.0)
  plain_kw.pop("guidance")
  plain_inc, plain_logits = sample_incremental(model, params, key, return_logits=True,
                                               **plain_kw)
  plain_ref = sample_reference(model, params, key, **plain_kw)
  ref, inc, logits = _sampled(1.0)
  np.testing.assert_array_equal(inc, np.asarray(plain_inc))
  np.testing.assert_array_equal(logits, np.asarray(plain_logits))
  np.testing.assert_array_equal(ref, np.asarray(plain_ref))
  # The doubled pass at w = 1 (not taken: guidance_active short-circuits) draws the same
  # codes, with logits equal up to float rounding.
  args = (model, draw_lib.plain_params(params), key, plain_kw["cond_codes"],
          plain_kw["labels"], jnp.float32(0.9), jnp.float32(0.95), jnp.float32(1.0))
  doubled, doubled_logits = incremental._sample(
      *args, shape=(B, H, W), top_k=6, nucleus=True, return_logits=True, sharding=None,
      guided=True)
  np.testing.assert_array_equal(np.asarray(doubled), inc)
  np.testing.assert_allclose(np.asarray(doubled_logits), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [0.0, 2.0, 3.0])
def test_samplers_agree_with_guidance(guidance):
  ref, inc, _ = _sampled(guidance)
  np.testing.assert_array_equal(inc, ref)
  assert inc.dtype == np.int32 and len(np.unique(inc)) > 2


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_guided_logits_are_the_teacher_forced_combination(guidance):
  model, params, cond, labels = _case()
  _, inc, logits = _sampled(guidance)
  full = jax.jit(functools.partial(model.apply, train=False))
  l_cond = np.asarray(full({"params": params}, inc, cond, labels))
  l_null = np.asarray(full({"params": params}, inc, cond, jnp.full_like(labels, CLASSES)))
  np.testing.assert_allclose(logits, l_null + guidance * (l_cond - l_null),
                             rtol=1e-4, atol=1e-4)


def test_guidance_zero_samples_the_null_label_model():
  model, params, _, _ = _case()
  ref, _, _ = _sampled(0.0)
  null = _kw(1.0, labels=jnp.full((B,), CLASSES, jnp.int32))
  plain = sample_reference(model, params, jax.random.key(11), **null)
  np.testing.assert_array_equal(ref, np.asarray(plain))


def test_guided_sampling_sharded_gives_the_same_codes():
  model, params, cond, labels = _case()
  if len(jax.devices()) < B:
    pytest.skip(f"needs {B} devices (tests/conftest.py provides 8 fake CPU ones)")
  # B devices: one row (and, doubled, its null-label copy) per device.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:B]), ("data",),
                           axis_types=(AxisType.Auto,))
  batch = NamedSharding(mesh, P("data"))
  kw = _kw(2.0, cond_codes=tuple(jax.device_put(c, batch) for c in cond),
           labels=jax.device_put(labels, batch))
  sharded = sample_incremental(model, params, jax.random.key(11), sharding=batch, **kw)
  np.testing.assert_array_equal(np.asarray(sharded), _sampled(2.0)[1])


def test_guidance_errors():
  model, params, cond, labels = _case()
  no_null = PixelSNAILPrior(**dict(MODEL, null_label=False))
  kw = _kw(2.0)
  for sampler in (sample_incremental, sample_reference):
    with pytest.raises(ValueError, match="label_dropout > 0"):
      sampler(no_null, _init(no_null), jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="guidance must be >= 0"):
      sampler(model, params, jax.random.key(0), **_kw(-1.0))
  with pytest.raises(ValueError, match="guidance"):
    SampleOptions(guidance=-0.5)


def test_run_incremental_api_unchanged_by_guidance():
  # The codec's entry point: same signature, the prior's null label does not change it.
  model, params, cond, labels = _case()
  codes, logits = run_incremental(model, params, shape=(B, H, W), cond_codes=cond,
                                  labels=labels, return_logits=True,
                                  choose=_argmax)
  full = model.apply({"params": params}, codes, cond, labels, train=False)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(codes), np.argmax(np.asarray(logits), -1))


def _argmax(p, logits):
  del p
  return jnp.argmax(logits, -1)


def test_hierarchical_sampler_passes_guidance_to_class_conditional_levels():
  from vqvae2_jax import parallel
  from vqvae2_jax.sampling.hierarchical import HierarchicalSampler
  import ml_collections
  bottom, bottom_params, _, labels = _case()
  top = PixelSNAILPrior(num_codes=K, hidden=8, res_hidden=8, num_layers=1,
                        num_classes=CLASSES, null_label=True)
  top_params = numpy_params(top, jnp.zeros((B, H // 2, W // 2), jnp.int32), (), labels)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
                            jax.devices()[:B])
  priors = dict(top=(top, top_params), bottom=(bottom, bottom_params))
  shapes = dict(top=(H // 2, W // 2), bottom=(H, W))
  options = SampleOptions(batch_size=B, guidance=2.0, **SAMPLE)
  key = jax.random.key(4)
  # Drawn under the mesh (the models' activation constraints apply), compared below with
  # draws traced without one.
  with parallel.use_mesh(mesh, config_lib.DEFAULT_AXIS_RULES):
    sampler = HierarchicalSampler(None, None, priors, shapes, options)
    codes = sampler.sample_codes(key, np.asarray(labels), B)
  kw = dict(labels=labels, guidance=2.0, **SAMPLE)
  want_top = sample_incremental(top, top_params, jax.random.fold_in(key, 0),
                                shape=(B, H // 2, W // 2), **kw)
  want_bottom = sample_incremental(bottom, bottom_params, jax.random.fold_in(key, 1),
                                   shape=(B, H, W), cond_codes=(want_top,), **kw)
  np.testing.assert_array_equal(np.asarray(codes["top"]), np.asarray(want_top))
  np.testing.assert_array_equal(np.asarray(codes["bottom"]), np.asarray(want_bottom))
  with parallel.use_mesh(mesh, config_lib.DEFAULT_AXIS_RULES):
    plain = HierarchicalSampler(None, None, priors, shapes,
                                SampleOptions(batch_size=B, **SAMPLE))
    assert np.any(np.asarray(plain.sample_codes(key, np.asarray(labels), B)["bottom"])
                  != np.asarray(want_bottom))
    no_null = PixelSNAILPrior(**dict(MODEL, null_label=False))
    with pytest.raises(ValueError, match="priors.bottom.label_dropout"):
      HierarchicalSampler(None, None, dict(priors, bottom=(no_null, bottom_params)), shapes,
                          options)


# ---- evaluation side ----

def test_sampling_cost_counts_candidates_and_the_doubled_batch():
  from vqvae2_jax.eval import tradeoff
  assert tradeoff.sampling_cost(400, 100, 1.0) == 4.0  # keep 0.25, no guidance
  assert tradeoff.sampling_cost(100, 100, 2.0) == 2.0  # guidance, no rejection
  assert tradeoff.sampling_cost(200, 100, 0.0) == 4.0  # w = 0 still runs both halves


def test_report_lists_guidance_rows_beside_rejection_and_plots_both(tmp_path):
  from vqvae2_jax.eval import report as report_lib
  row = lambda f, w, cost, fid: dict(keep_fraction=f, guidance=w, candidates=8,
                                     num_images=8, sampling_cost=cost, fid=fid, is_mean=2.0,
                                     precision=0.5, recall=0.4, mean_class_score=0.3)
  report = {"tradeoff": [row(1.0, 1.0, 1.0, 10.0), row(0.5, 1.0, 2.0, 9.0)],
            "guidance": [row(1.0, 2.0, 2.0, 8.0), row(1.0, 3.0, 2.0, 7.5)]}
  written = report_lib.write(report, str(tmp_path))
  md = (tmp_path / "report.md").read_text()
  assert "Guidance w" in md and "| 1.000 | 3.000 |" in md and "Cost" in md
  assert written["tradeoff_plot"] == "tradeoff.png" and (tmp_path / "tradeoff.png").exists()
  # Guidance rows alone (no rejection classifier) still make a trade-off section.
  only = report_lib.render_markdown({"tradeoff": report["tradeoff"][:1],
                                     "guidance": report["guidance"][:1]})
  assert "Guidance w" in only and "| 1.000 | 2.000 |" in only


def test_candidate_key_names_guidance_only_when_on(tmp_path):
  from vqvae2_jax.eval import tradeoff
  import json, os
  sampler = _FakeSampler(SampleOptions(batch_size=2))
  kw = dict(seed=0, image_size=2, model_steps={})
  tradeoff.generate_candidates(sampler, 2, str(tmp_path / "a"), log=lambda m: None, **kw)
  key = json.load(open(os.path.join(tmp_path, "a", tradeoff.PROGRESS)))["key"]
  assert "guidance" not in key  # keys written before guidance existed stay valid
  sampler = _FakeSampler(SampleOptions(batch_size=2, guidance=2.0))
  tradeoff.generate_candidates(sampler, 2, str(tmp_path / "b"), log=lambda m: None, **kw)
  assert json.load(open(os.path.join(tmp_path, "b", tradeoff.PROGRESS)))["key"][
      "guidance"] == 2.0


class _FakeSampler:
  num_classes = 2

  def __init__(self, options):
    self.options = options

  def generate(self, n, labels, seed, progress=False):
    del labels, seed, progress
    return {"image": np.zeros((n, 2, 2, 3), np.uint8)}


def test_evaluate_stage_reports_guidance_rows(tmp_path):
  """The tiny pipeline with label_dropout > 0, evaluated at two guidance scales."""
  import json, os
  from vqvae2_jax import main
  from helpers import load_config
  dropout = {"priors.top.label_dropout": 0.5, "priors.bottom.label_dropout": 0.5}
  workdir = str(tmp_path)
  for stage in ("vqvae", "extract", "prior_top", "prior_bottom", "classifier"):
    main.run_stage(load_config("demo", f"{stage},tiny", **dropout), workdir)
  main.run_stage(load_config("demo", "evaluate,tiny", **dropout,
                             **{"evaluate.guidance_scales": (1.0, 2.0),
                                "evaluate.cas": True, "evaluate.cas_per_point": True}),
                 workdir)
  report = json.load(open(os.path.join(workdir, "evaluate", "report.json")))
  if report["networks"]["fid"] is None and report["networks"]["precision_recall"] is None:
    assert "guidance" not in report  # no feature network: every sample metric skipped
    pytest.skip("no feature network weights (torch or converted EfficientNet-Lite0)")
  assert [r["guidance"] for r in report["tradeoff"]] == [1.0, 1.0]
  (row,) = report["guidance"]
  assert row["guidance"] == 2.0 and row["keep_fraction"] == 1.0 and row["num_images"] == 8
  assert row["sampling_cost"] == 2.0 and row["mean_class_score"] is not None
  assert row.get("precision") is not None or row.get("fid") is not None
  assert "| 1.000 | 2.000 |" in open(os.path.join(workdir, "evaluate", "report.md")).read()
  # Every point is timed, and every point has its own CAS classifier, in its own folder.
  rows = report["tradeoff"] + report["guidance"]
  assert all(r["seconds_per_image"] > 0 for r in rows)
  assert all(0 <= r["cas_top1"] <= r["cas_top5"] <= 1 for r in rows)
  for name in ("cas_samples", "cas_samples_keep0.5", "cas_samples_w2"):
    assert os.path.isdir(os.path.join(workdir, "evaluate", name, "checkpoints")), name
  assert report["guidance_grid"] == "guidance.png"
  assert os.path.exists(os.path.join(workdir, "evaluate", "guidance.png"))
