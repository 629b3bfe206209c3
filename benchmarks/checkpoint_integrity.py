"""What the array checksums cost a checkpoint save and restore, on a mid-size prior.

  python benchmarks/checkpoint_integrity.py [--hidden 256 --layers 10 --repeats 3]

Builds the full train state of a PixelSNAIL prior (params + Adam moments, float32) from
NumPy parameters and times, side by side in one run, `Checkpointer.save` and
`Checkpointer.restore` with and without the checksum work (`integrity.tree_checksums`
replaced by a no-op for the baseline), plus the checksum pass alone. Prints medians,
ratios and the load average (other processes share the CPU; absolute times mean little
off an idle machine).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import integrity
from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.train import state as state_lib
import ml_collections


def build_state(hidden: int, layers: int):
  prior = PixelSNAILPrior(num_codes=512, hidden=hidden, res_hidden=hidden, num_layers=layers,
                          attention_every=5, num_heads=4, num_output_layers=4, num_classes=10)
  codes, labels = jnp.zeros((1, 8, 8), jnp.int32), jnp.zeros((1,), jnp.int32)
  params = state_lib.numpy_params(lambda k: prior.init(k, codes, (), labels, train=False))
  tx = state_lib.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=0, grad_clip_norm=0.0, weight_decay=0.0)))
  opt_state = jax.tree.map(lambda x: x + 0.5, tx.init(params))  # non-zero moments
  return state_lib.TrainState(step=jnp.int32(7), params=params, opt_state=opt_state,
                              model_state={}, ema_params={}, rng=jax.random.PRNGKey(0))


def timed(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  state = build_state(args.hidden, args.layers)
  jax.block_until_ready(state)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  print(f"prior hidden={args.hidden} layers={args.layers}: {n_params / 1e6:.1f}M params, "
        f"train state {n_bytes / 2**20:.0f} MiB; load {os.getloadavg()}")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=x.sharding), state)
  root = tempfile.mkdtemp()
  real_checksums = integrity.tree_checksums
  results = {}
  try:
    for mode in ("without", "with", "without", "with"):  # interleaved against drift
      integrity.tree_checksums = real_checksums if mode == "with" else (lambda tree: {})
      directory = os.path.join(root, mode)
      shutil.rmtree(directory, ignore_errors=True)
      ckpt = ckpt_lib.Checkpointer(directory, keep=None)
      counter = iter(range(1000))
      save = timed(lambda: ckpt.save(next(counter), state, {"step": 0}), args.repeats)
      restore = timed(lambda: jax.block_until_ready(ckpt.restore(abstract)), args.repeats)
      ckpt.close()
      results.setdefault(mode, []).append((save, restore))
  finally:
    integrity.tree_checksums = real_checksums
    shutil.rmtree(root, ignore_errors=True)
  checksum = timed(lambda: integrity.tree_checksums(state), args.repeats)
  med = {m: (statistics.median(s for s, _ in r), statistics.median(t for _, t in r))
         for m, r in results.items()}
  (s0, r0), (s1, r1) = med["without"], med["with"]
  print(f"save:    {s0:.3f}s without checksums, {s1:.3f}s with ({s1 / s0:.2f}x, "
        f"+{s1 - s0:.3f}s)")
  print(f"restore: {r0:.3f}s without verification, {r1:.3f}s with ({r1 / r0:.2f}x, "
        f"+{r1 - r0:.3f}s)")
  print(f"checksum pass alone: {checksum:.3f}s ({n_bytes / 2**20 / checksum:.0f} MiB/s); "
        f"load {os.getloadavg()}")


if __name__ == "__main__":
  main()
