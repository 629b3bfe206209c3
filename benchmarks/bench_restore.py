r"""Peak host memory of restoring a trained prior: params only (inference) vs the whole state.

Writes one checkpoint of a mid-size prior (Adam moments and a parameter EMA included, as a
prior trained with param_ema_decay > 0 saves it), then restores it in fresh processes, one
per mode, and reports each process's peak resident memory (ru_maxrss) and restore time:

  full      restore.restore_train_state: params, both Adam moments, the EMA (what
            extract / sample / evaluate did before they restored parameters only)
  inference restore.restore_inference_variables: the EMA parameters only
  baseline  the same process without any restore (imports, model build, tracing)

  python benchmarks/bench_restore.py [--hidden 256 --layers 12] [--workdir /tmp/bench_restore]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _prior_config(args):
  from vqvae2_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.priors.top = config_lib.prior_config(
      hidden=args.hidden, res_hidden=2 * args.hidden, num_layers=args.layers,
      attention_every=4, num_heads=4, kernel_size=5, num_output_layers=2,
      class_conditional=False,
      train=config_lib.train_config(param_ema_decay=0.999, steps=1))
  config.vqvae.num_codes = 512
  return config


MANIFEST = {"levels": ["top"], "shapes": {"top": [32, 32]}, "num_codes": 512,
            "num_classes": 0}


def _build(args):
  from vqvae2_jax import builders, parallel  # pylint: disable=g-import-not-at-top
  config = _prior_config(args)
  prior = builders.build_prior(config, "top", MANIFEST)
  return config, prior, builders.prior_init_fn(prior, MANIFEST, "top"), parallel.make_mesh(
      config.mesh)


def write_checkpoint(args) -> int:
  """Saves step 1 of a prior's TrainState (NumPy-filled params; no PRNG kernels)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top
  config, _, init, _ = _build(args)
  params = state_lib.numpy_params(init)
  tx = state_lib.make_optimizer(config.priors.top.train)
  state = state_lib.TrainState(step=jax.numpy.ones((), jax.numpy.int32), params=params,
                               opt_state=tx.init(params), model_state={}, ema_params=params,
                               rng=jax.random.PRNGKey(0))
  w = Workdir(args.workdir)
  w.write_config("prior_top", config)
  checkpointer = ckpt_lib.Checkpointer(w.checkpoint_dir("prior_top"))
  checkpointer.save(1, state, {"step": 1, "data": {}})
  checkpointer.close()
  return sum(x.size for x in jax.tree.leaves(params))


def _status_mb(field: str) -> float:
  """VmRSS (resident now) or VmHWM (peak resident) of this process, MiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def restore_once(args) -> dict:
  """One mode in this process: {'mode', 'seconds', 'rss_before_mb', 'rss_after_mb',
  'peak_rss_mb'} (resident memory before / after the restore, the arrays held)."""
  from vqvae2_jax import parallel, restore  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config, _, init, mesh = _build(args)
  jax.eval_shape(init, jax.random.PRNGKey(0))  # tracing, in every mode alike
  w = Workdir(args.workdir)
  before = _status_mb("VmRSS")
  start = time.perf_counter()
  held = None
  with parallel.use_mesh(mesh, config.axis_rules):
    if args.mode == "full":
      state, _ = restore.restore_train_state(w, "prior_top", init, config.priors.top.train)
      held = jax.block_until_ready(state)
    elif args.mode == "inference":
      variables, _ = restore.restore_inference_variables(w, "prior_top", init)
      held = jax.block_until_ready(variables)
  seconds = time.perf_counter() - start
  after = _status_mb("VmRSS")
  del held
  return {"mode": args.mode, "seconds": seconds, "rss_before_mb": before,
          "rss_after_mb": after, "peak_rss_mb": _status_mb("VmHWM")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--workdir", default="/tmp/bench_restore")
  parser.add_argument("--mode", choices=("baseline", "full", "inference"), default=None,
                      help="internal: run one mode in this process")
  args = parser.parse_args()
  if args.mode:
    print(json.dumps(restore_once(args)))
    return
  num_params = write_checkpoint(args)
  print(f"prior: hidden {args.hidden}, {args.layers} layers, {num_params / 1e6:.1f}M params "
        f"({num_params * 4 / 2**20:.0f} MiB float32); checkpoint holds params, 2 Adam "
        f"moments and an EMA; load average {os.getloadavg()[0]:.1f}")
  rows = {}
  for mode in ("baseline", "full", "inference"):
    out = subprocess.run([sys.executable, __file__, "--mode", mode, "--hidden",
                          str(args.hidden), "--layers", str(args.layers), "--workdir",
                          args.workdir], capture_output=True, text=True, check=True)
    rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
  for mode in ("baseline", "full", "inference"):
    r = rows[mode]
    print(f"{mode:>9}: restore adds {r['rss_after_mb'] - r['rss_before_mb']:6.0f} MiB resident "
          f"({r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f}); process peak "
          f"{r['peak_rss_mb']:.0f} MiB; {r['seconds']:.2f} s")
  full, inf = (rows[m]["rss_after_mb"] - rows[m]["rss_before_mb"] for m in ("full", "inference"))
  print(f"params-only restore holds {full / max(inf, 1e-9):.2f}x less memory than the whole "
        f"state and is {rows['full']['seconds'] / rows['inference']['seconds']:.2f}x faster")

if __name__ == "__main__":
  main()
