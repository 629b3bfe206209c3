"""Prior training on code shards: the FSDP-sharded step equals the replicated one."""
import jax
import numpy as np
import pytest

from vqvae2_jax import parallel
from vqvae2_jax.stages import prior_stage
from vqvae2_jax.train import loop
from vqvae2_jax.workdir import Workdir

from helpers import load_config

# Tests sharing the session-wide tiny pipeline run in one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_pipeline")


def train_prior(tiny_pipeline, out_dir, level, mesh_overrides, steps=2):
  config = load_config("demo", f"prior_{level},tiny", **mesh_overrides,
                       **{f"priors.{level}.train.steps": steps,
                          f"priors.{level}.train.eval_every": 0,
                          f"priors.{level}.train.checkpoint_every": 100,
                          f"priors.{level}.dropout": 0.0})
  out = Workdir(out_dir)
  with parallel.use_mesh(parallel.make_mesh(config.mesh), config.axis_rules):
    task = prior_stage.build_task(config, level, Workdir(tiny_pipeline))
    task.evaluate = None
    return loop.train(task, config.priors[level].train, directory=out.stage_dir(task.name),
                      checkpoint_dir=out.checkpoint_dir(task.name), seed=config.seed)


def test_fsdp_sharded_step_equals_replicated(tiny_pipeline, tmp_path):
  replicated = train_prior(tiny_pipeline, str(tmp_path / "dp"), "bottom",
                           {"mesh.data": 8, "mesh.fsdp": 1})
  sharded = train_prior(tiny_pipeline, str(tmp_path / "fsdp"), "bottom",
                        {"mesh.data": 2, "mesh.fsdp": 4})
  # The FSDP run really shards parameters (output channels over the 4-way 'fsdp' axis).
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded.params)]
  assert any("fsdp" in str(s) for s in specs)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(replicated.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=2e-4, atol=2e-6),
               replicated.params, sharded.params)
