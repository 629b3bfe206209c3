"""A trained run as an object: recorded model configs, params-only restore, the Python API."""
import json
import os

import chex
import numpy as np
import pytest

import vqvae2_jax
from vqvae2_jax import main
from vqvae2_jax import parallel
from vqvae2_jax import restore
from vqvae2_jax import builders
from vqvae2_jax.workdir import ConfigConflictError, StageMissingError, Workdir

from helpers import load_config

pytestmark = pytest.mark.xdist_group("tiny_pipeline")


def _fake_record(workdir: Workdir, stage: str, config) -> None:
  """A stage record plus an (empty) checkpoint step: what binds a trained model."""
  workdir.write_config(stage, config)
  os.makedirs(os.path.join(workdir.checkpoint_dir(stage), "3"))


def test_recorded_model_fields_replace_defaults_and_explicit_conflicts_fail(tmp_path):
  w = Workdir(str(tmp_path))
  _fake_record(w, "vqvae", load_config("demo", "vqvae,tiny", **{"vqvae.hidden": 24}))
  _fake_record(w, "prior_top", load_config("demo", "prior_top,tiny",
                                           **{"priors.top.num_heads": 4}))
  later = load_config("demo", "sample,tiny", **{"sample.batch_size": 16,
                                                "priors.top.train.steps": 99})
  resolved = w.resolve_recorded(later)
  assert resolved.vqvae.hidden == 24 and resolved.priors.top.num_heads == 4
  # Fields that do not shape a trained model keep the command line's values.
  assert resolved.sample.batch_size == 16 and resolved.priors.top.train.steps == 99
  # Tuples survive the JSON record.
  assert isinstance(resolved.axis_rules, tuple)
  with pytest.raises(ConfigConflictError, match=r"vqvae.hidden=32.*vqvae.hidden=24"):
    w.resolve_recorded(load_config("demo", "extract,tiny", **{"vqvae.hidden": 32}),
                       explicit=("vqvae.hidden",))
  # An explicit value equal to the record is fine, as is an explicit training field.
  w.resolve_recorded(load_config("demo", "extract,tiny", **{"vqvae.hidden": 24}),
                     explicit=("vqvae.hidden", "vqvae_train.batch_size"))


def test_a_record_without_checkpoint_does_not_bind(tmp_path):
  w = Workdir(str(tmp_path))
  w.write_config("vqvae", load_config("demo", "vqvae,tiny", **{"vqvae.hidden": 24}))
  resolved = w.resolve_recorded(load_config("demo", "vqvae,tiny", **{"vqvae.hidden": 32}),
                                explicit=("vqvae.hidden",))
  assert resolved.vqvae.hidden == 32


def test_missing_stages_are_named(tmp_path):
  w = Workdir(str(tmp_path))
  with pytest.raises(StageMissingError, match="run the vqvae stage"):
    w.latest_step("vqvae")
  with pytest.raises(StageMissingError, match="run the extract stage"):
    w.manifest()
  with pytest.raises(StageMissingError, match="train the vqvae stage"):
    vqvae2_jax.load(str(tmp_path))


def test_later_stages_need_no_repeated_override(tmp_path):
  """The issue's acceptance run: hidden=24 once, then extract reads the record."""
  workdir = str(tmp_path)
  main.run_stage(load_config("demo", "vqvae,tiny", **{"vqvae.hidden": 24}), workdir,
                 explicit=("vqvae.hidden",))
  main.run_stage(load_config("demo", "extract,tiny"), workdir)  # no override
  manifest = json.load(open(os.path.join(workdir, "extract", "manifest.json")))
  assert manifest["levels"] == ["top", "bottom"]
  with pytest.raises(ConfigConflictError, match="vqvae.hidden=32.*vqvae.hidden=24"):
    main.run_stage(load_config("demo", "extract,tiny", **{"vqvae.hidden": 32}), workdir,
                   explicit=("vqvae.hidden",))
  run = vqvae2_jax.load(workdir)
  assert run.config.vqvae.hidden == 24
  images = np.random.RandomState(0).randint(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  codes = run.encode(images)
  chex.assert_shape(codes, [(3, 4, 4), (3, 8, 8)])
  assert all(c.dtype == np.int32 for c in codes)
  recon = run.decode(codes)
  chex.assert_shape(recon, (3, 32, 32, 3))
  np.testing.assert_array_equal(recon, run.reconstruct(images))
  # Figure 3: the top level alone differs from both levels.
  assert not np.array_equal(run.reconstruct(images, levels=("top",)), recon)
  with pytest.raises(StageMissingError, match="run the prior_top stage"):
    run.sample(2)
  with pytest.raises(ValueError, match=r"uint8 \[B, 32, 32, 3\]"):
    run.encode(images[:, :16])


def test_inference_restore_reads_no_optimizer_state(tiny_pipeline):
  """Params-only restore equals the params of the full train state, without opt_state."""
  config = load_config("demo", "prior_top,tiny")
  w = Workdir(tiny_pipeline)
  run = vqvae2_jax.load(tiny_pipeline)
  prior = builders.build_prior(run.config, "top", run.manifest)
  init = builders.prior_init_fn(prior, run.manifest, "top")
  with parallel.use_mesh(run.mesh, config.axis_rules):
    variables, step = restore.restore_inference_variables(w, "prior_top", init)
    assert set(variables) == {"params"}
    state, record = restore.restore_train_state(w, "prior_top", init,
                                                config.priors.top.train)
  assert record["step"] == step
  chex.assert_trees_all_equal(variables["params"], state.params)


def test_run_methods_enter_their_own_mesh_and_the_library_needs_one(tiny_pipeline):
  """A notebook calls Run methods without any context; each enters the Run's mesh and
  leaves none behind. The library below them, called bare, says what to do."""
  assert not parallel.mesh_is_set()
  run = vqvae2_jax.load(tiny_pipeline)
  images = run.sample(2, labels=[0, 1], seed=1)
  codes = run.encode(images)
  np.testing.assert_array_equal(run.decode(codes), run.reconstruct(images))
  assert np.all(np.isfinite(run.log_prob(images)["bits"]))
  assert not parallel.mesh_is_set()
  model, _ = run.vqvae
  init = builders.vqvae_init_fn(model, run.config.data.image_size)
  with pytest.raises(RuntimeError, match="parallel.use_mesh"):
    restore.restore_inference_variables(run.workdir, "vqvae", init)
  with parallel.use_mesh(run.mesh, run.config.axis_rules):  # nested entry: unchanged
    np.testing.assert_array_equal(run.encode(images)[0], codes[0])


def test_api_samples_classifies_and_matches_the_stage_models(tiny_pipeline):
  run = vqvae2_jax.load(tiny_pipeline)
  assert run.has("prior_top") and run.has("classifier") and run.num_classes > 1
  images, codes = run.sample(4, labels=[1, 2], temperature=0.8, seed=3, return_codes=True)
  chex.assert_shape(images, (4, 32, 32, 3))
  assert images.dtype == np.uint8
  # Decoding the sampled codes gives the sampled images; sampling is reproducible.
  np.testing.assert_array_equal(run.decode(codes), images)
  np.testing.assert_array_equal(run.sample(4, labels=[1, 2], temperature=0.8, seed=3), images)
  probs = run.classify(images)
  chex.assert_shape(probs, (4, run.num_classes))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="not classes of this model"):
    run.sample(2, labels=[99])
  mesh = parallel.make_mesh(run.config.mesh)
  assert run.mesh.size == mesh.size
