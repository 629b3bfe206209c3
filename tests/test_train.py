"""Stage-1 training: 8 devices == 1 device, resume == uninterrupted, NaN, bad resume."""
import os
import signal

import jax
import numpy as np
import pytest

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import parallel
from vqvae2_jax import restore as restore_lib
from vqvae2_jax.stages import vqvae_stage
from vqvae2_jax.workdir import Workdir
from vqvae2_jax.train import loop

from helpers import load_config


def tiny_config(**overrides):
  return load_config("demo", "vqvae,tiny", **{"vqvae_train.eval_every": 0,
                                              "vqvae_train.image_every": 0, **overrides})


def run(config, workdir, devices=None, loader_hook=None):
  mesh = parallel.make_mesh(config.mesh, devices)
  w = Workdir(workdir)
  with parallel.use_mesh(mesh, config.axis_rules):
    task = vqvae_stage.build_task(config, w)
    task.evaluate = task.pictures = None
    if loader_hook is not None:
      task.loader = loader_hook(task.loader)
    return loop.train(task, config.vqvae_train, directory=w.stage_dir("vqvae"),
                      checkpoint_dir=w.checkpoint_dir("vqvae"), seed=config.seed)


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get((state.params, state.model_state)))


def assert_trees_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_eight_devices_equal_one(tmp_path):
  config = tiny_config(**{"vqvae_train.steps": 2, "vqvae_train.checkpoint_every": 100})
  one = run(config, str(tmp_path / "one"), devices=jax.devices()[:1])
  eight = run(config, str(tmp_path / "eight"), devices=jax.devices()[:8])
  assert len(eight.params["decoder"]["Conv_0"]["kernel"].sharding.device_set) == 8
  # EMA codebook statistics are those of the global batch on both meshes.
  assert_trees_close(params_of(one), params_of(eight), rtol=2e-4, atol=2e-6)


class _Interrupt:
  """Wraps a loader and sends SIGTERM to this process when batch `at` is requested."""

  def __init__(self, loader, at):
    self.loader, self.at, self.count = loader, at, 0

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.loader)

  def get_state(self):
    return self.loader.get_state()

  def set_state(self, s):
    self.loader.set_state(s)


def test_resume_after_sigterm_equals_uninterrupted(tmp_path):
  config = tiny_config(**{"vqvae_train.steps": 5, "vqvae_train.checkpoint_every": 100})
  straight = run(config, str(tmp_path / "straight"))
  workdir = str(tmp_path / "interrupted")
  previous = signal.getsignal(signal.SIGTERM)
  try:
    with pytest.raises(ckpt_lib.Preempted) as stopped:
      run(config, workdir, loader_hook=lambda l: _Interrupt(l, at=3))
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert stopped.value.step == 3
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "vqvae", "checkpoints"))
  assert ckpt.latest_step() == 3
  ckpt.close()
  resumed = run(config, workdir)
  assert int(resumed.step) == 5
  assert_trees_close(params_of(straight), params_of(resumed), rtol=1e-5, atol=1e-7)
  steps = [__import__("json").loads(l)["step"]
           for l in open(os.path.join(workdir, "vqvae", "metrics.jsonl"))]
  assert steps == sorted(steps) and steps[-1] == 5


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # Warm-up keeps step 1 sane; step 2's huge update makes step 3 NaN (tests/test_faults.py).
  config = tiny_config(**{"vqvae_train.steps": 6, "vqvae_train.checkpoint_every": 1,
                          "vqvae_train.learning_rate": 1e30, "vqvae_train.warmup_steps": 4})
  with pytest.raises(loop.NonFiniteLossError, match="loss=nan"):
    run(config, str(tmp_path))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "vqvae" / "checkpoints"))
  last = ckpt.latest_step()
  assert last is not None and last < 6
  ckpt.close()
  # The surviving checkpoint is readable and finite.
  with parallel.use_mesh(parallel.make_mesh(config.mesh), config.axis_rules):
    task = vqvae_stage.build_task(config, Workdir(str(tmp_path)))
    state, record = restore_lib.restore_train_state(
        Workdir(str(tmp_path)), "vqvae", task.init_variables, config.vqvae_train)
  assert record["step"] == last
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params_of(state)))


def test_resume_with_other_shapes_is_a_clear_error(tmp_path):
  config = tiny_config(**{"vqvae_train.steps": 1, "vqvae_train.checkpoint_every": 1})
  run(config, str(tmp_path))
  other = tiny_config(**{"vqvae_train.steps": 2, "vqvae.hidden": 24})
  with pytest.raises(ckpt_lib.CheckpointError, match="another shape"):
    run(other, str(tmp_path))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  config = tiny_config(**{"vqvae_train.steps": 1, "vqvae_train.checkpoint_every": 1})
  run(config, str(tmp_path))
  state_dir = tmp_path / "vqvae" / "checkpoints" / "1" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      if not name.startswith("_") and "commit" not in name:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match="corrupt|unreadable|could not read"):
    run(tiny_config(**{"vqvae_train.steps": 2}), str(tmp_path))
