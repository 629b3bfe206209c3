"""Prior training throughput: seconds per step, latents per second, XLA FLOPs per step.

Times the real jitted prior train step (`loop.make_train_step` with the prior stage's
cross-entropy loss, the config's Adam and parameter EMA) on random codes for:

  demo_top, demo_bottom  the demo experiment's priors (configs/demo.py), 8x8 / 16x16
  top85m                 an unconditional 32x32 top prior matched in size to the public
                         PyTorch PixelSNAIL top prior (rosinality/vq-vae-2-pytorch
                         train_pixelsnail.py defaults: channel 256, kernel 5, 4 blocks of
                         4 gated residual blocks, res channel 256, attention, 0 output
                         blocks, dropout 0.1, K 512: 84.9M params): hidden 256, 25 gated
                         layers, attention after every 5th (8 heads), kernel 5 -> 85.0M.
                         With --torch the PyTorch model (benchmarks/torch_reference.py,
                         86.5M: its attention-side blocks are wider than the public
                         code's, see `public_widths`) is timed beside it, interleaved.
  imagenet_top           the paper's ImageNet top prior (Table 3, configs/imagenet256.py:
                         512/2048, 20 layers, 4 attention layers, 20 output layers,
                         1000 classes, 335.8M params) on 32x32 codes.

Compilation is timed separately. The ImageNet top prior takes minutes per step on a
2-core CPU: it runs `--imagenet-steps` (default 1) timed steps and no warm-up.

  python benchmarks/bench_prior.py --torch
  python benchmarks/bench_prior.py --only demo_top demo_bottom
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vqvae as bv  # noqa: E402  pylint: disable=g-import-not-at-top

from vqvae2_jax import parallel  # noqa: E402
from vqvae2_jax.models.prior import PixelSNAILPrior  # noqa: E402
from vqvae2_jax.aot.programs import manifest_from_config  # noqa: E402
from vqvae2_jax import builders  # noqa: E402
from vqvae2_jax.train import losses  # noqa: E402
from vqvae2_jax.train import loop  # noqa: E402
from vqvae2_jax.train import state as state_lib  # noqa: E402

PRIORS = ("demo_top", "demo_bottom", "top85m", "imagenet_top")


def manifest_for(config, num_classes: int) -> dict[str, Any]:
  """The code-shard manifest fields build_prior reads, for config's image size."""
  return manifest_from_config(config, num_classes)


class JaxPriorBench:
  """Compiled train step of one prior on random codes."""

  def __init__(self, name: str, prior: PixelSNAILPrior, manifest: dict, level: str,
               train_config, batch: int, seed: int = 0):
    self.name, self.batch, self.framework = name, batch, "jax"
    _, upper, _ = builders.prior_level_info(manifest, level)
    h, w = manifest["shapes"][level]
    self.grid, self.latents = f"{h}x{w}", batch * h * w
    self.widths = dict(hidden=prior.hidden, res_hidden=prior.res_hidden,
                       layers=prior.num_layers,
                       attention=(prior.num_layers // prior.attention_every
                                  if prior.attention_every else 0),
                       out_layers=prior.num_output_layers, cond_layers=prior.num_cond_layers,
                       classes=prior.num_classes, kernel=prior.kernel_size)
    tx = state_lib.make_optimizer(train_config)
    ema = train_config.param_ema_decay
    params = state_lib.numpy_params(builders.prior_init_fn(prior, manifest, level))
    self.params = bv.count_params(params)
    self.state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
        model_state={}, ema_params=jax.tree.map(jnp.copy, params) if ema > 0 else {},
        rng=jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    k = manifest["num_codes"]
    batch_arrays = {level: rng.integers(0, k, (batch, h, w), dtype=np.int32)}
    for u in upper:
      batch_arrays[u] = rng.integers(0, k, (batch, *manifest["shapes"][u]), dtype=np.int32)
    if prior.num_classes:
      batch_arrays["label"] = rng.integers(0, prior.num_classes, (batch,), dtype=np.int32)
    self.batch_arrays = jax.device_put(batch_arrays)
    step = loop.make_train_step(losses.prior_loss_fn(prior, level, upper), tx, ema)
    self._train, self.compile_s = bv.compile_timed(step, self.state, self.batch_arrays,
                                                   donate_argnums=0)
    self.flops = bv.xla_flops(self._train)
    self.ema = ema

  def train(self) -> None:
    self.state, metrics = self._train(self.state, self.batch_arrays)
    jax.block_until_ready(metrics["loss"])


class TorchPriorBench:
  """The public PixelSNAIL top prior (unconditional), Adam 3e-4, fp32, NCHW."""

  def __init__(self, name: str, size: int, num_codes: int, channel: int, n_block: int,
               n_res_block: int, res_channel: int, batch: int, threads: int, seed: int = 0):
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference as ref  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    self.torch, self.ref = torch, ref
    self.name, self.batch, self.framework = name, batch, "torch"
    self.grid, self.latents = f"{size}x{size}", batch * size * size
    self.widths = dict(channel=channel, blocks=n_block, res_blocks=n_res_block,
                       res_channel=res_channel, kernel=5)
    self.model = ref.TorchPixelSNAIL((size, size), num_codes, channel, 5, n_block,
                                     n_res_block, res_channel, dropout=0.1)
    self.opt = torch.optim.Adam(self.model.parameters(), lr=3e-4)
    self.params = ref.num_params(self.model)
    gen = torch.Generator().manual_seed(seed)
    self.codes = torch.randint(0, num_codes, (batch, size, size), generator=gen)
    self.compile_s, self.ema = None, 0.0
    self.flops = self._count_flops()

  def _count_flops(self) -> float | None:
    """Conv/matmul FLOPs of one train step (FlopCounterMode on one example x batch)."""
    try:
      from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    except ImportError:
      return None
    with FlopCounterMode(display=False) as counter:
      self.ref.prior_loss(self.model, self.codes[:1]).backward()
    self.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) * self.batch

  def train(self) -> None:
    self.model.train()
    self.opt.zero_grad(set_to_none=True)
    self.ref.prior_loss(self.model, self.codes).backward()
    self.opt.step()


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags (see --help)."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", nargs="*", default=None, choices=PRIORS)
  ap.add_argument("--batch", type=int, default=8, help="batch of top85m / imagenet_top")
  ap.add_argument("--demo-batch", type=int, default=None,
                  help="batch of the demo priors (default: the demo config's)")
  ap.add_argument("--demo-presets", default="", help="presets for configs/demo.py, e.g. tiny")
  ap.add_argument("--demo-classes", type=int, default=10,
                  help="classes of the demo priors (the demo photographs)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "config"))
  ap.add_argument("--steps", type=int, default=3, help="timed steps (demo, top85m)")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--imagenet-steps", type=int, default=1)
  ap.add_argument("--imagenet-warmup", type=int, default=0)
  ap.add_argument("--top-size", type=int, default=32, help="grid of top85m / torch")
  ap.add_argument("--matched-hidden", type=int, default=256)
  ap.add_argument("--matched-layers", type=int, default=25)
  ap.add_argument("--matched-attention-every", type=int, default=5)
  ap.add_argument("--torch", action="store_true", help="time the PyTorch PixelSNAIL beside "
                  "top85m")
  ap.add_argument("--torch-channel", type=int, default=256)
  ap.add_argument("--torch-blocks", type=int, default=4)
  ap.add_argument("--torch-res-blocks", type=int, default=4)
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--json", default="")
  return ap.parse_args(argv)


def _dtype(args, config_dtype: str):
  return parallel.to_dtype(config_dtype if args.dtype == "config" else args.dtype)


def build(name: str, args) -> list[Any]:
  """The benchmark objects of one group (top85m may bring the torch model along)."""
  if name.startswith("demo_"):
    level = name[len("demo_"):]
    config = bv.load_config("demo", ",".join(["prior_" + level] +
                                             [p for p in args.demo_presets.split(",") if p]))
    manifest = manifest_for(config, args.demo_classes)
    p = config.priors[level]
    prior = builders.build_prior(config, level, manifest, _dtype(args, p.train.dtype))
    return [JaxPriorBench(name, prior, manifest, level, p.train,
                          args.demo_batch or p.train.batch_size)]
  if name == "imagenet_top":
    config = bv.load_config("imagenet256", "prior_top")
    manifest = manifest_for(config, 1000)
    p = config.priors.top
    prior = builders.build_prior(config, "top", manifest, _dtype(args, p.train.dtype))
    return [JaxPriorBench(name, prior, manifest, "top", p.train, args.batch)]
  # top85m: widths of the public PyTorch top prior, its recipe (Adam 3e-4, no EMA).
  s = args.top_size
  manifest = dict(levels=["top", "bottom"], shapes={"top": [s, s], "bottom": [2 * s, 2 * s]},
                  num_codes=512, num_classes=0)
  prior = PixelSNAILPrior(num_codes=512, hidden=args.matched_hidden,
                          res_hidden=args.matched_hidden, num_layers=args.matched_layers,
                          attention_every=args.matched_attention_every, num_heads=8,
                          kernel_size=5, dropout=0.1, attn_dropout=0.1, num_output_layers=0,
                          dtype=_dtype(args, "float32"))
  train = bv.load_config("demo", "prior_top").priors.top.train
  train.update(dict(learning_rate=3e-4, param_ema_decay=0.0, warmup_steps=0,
                    grad_clip_norm=0.0, weight_decay=0.0))
  benches = []
  if args.torch:
    benches.append(TorchPriorBench("torch PixelSNAIL", s, 512, args.torch_channel,
                                   args.torch_blocks, args.torch_res_blocks,
                                   args.torch_channel, args.batch, args.torch_threads))
  benches.append(JaxPriorBench(name, prior, manifest, "top", train, args.batch))
  return benches


def print_rows(rows) -> None:
  """Prints one table row per measured prior."""
  head = (f"{'prior':<18}{'grid':>6}{'batch':>6}{'params':>9}{'compile s':>10}{'s/step':>9}"
          f"{'latents/s':>11}{'TFLOP/step':>11}{'GFLOP/s':>9}  widths")
  print(head)
  print("-" * (len(head) + 30))
  for r in rows:
    tf = None if r["flops"] is None else r["flops"] / 1e12
    gfs = None if r["flops"] is None else r["flops"] / r["s_per_step"] / 1e9
    widths = " ".join(f"{k}={v}" for k, v in r["widths"].items())
    print(f"{r['name']:<18}{r['grid']:>6}{r['batch']:>6}{bv.fmt_params(r['params']):>9}"
          f"{bv.fmt(r['compile_s'], '.1f', 10)}{bv.fmt(r['s_per_step'], '.3f')}"
          f"{bv.fmt(r['latents_per_s'], '.0f', 11)}{bv.fmt(tf, '.3f', 11)}{bv.fmt(gfs, '.0f')}"
          f"  {widths}{' ema' if r['ema'] else ''}", flush=True)


def main(argv=None) -> list[dict[str, Any]]:
  """Measures every selected prior; returns the rows it printed."""
  args = parse_args(argv)
  if args.torch:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  env = bv.environment()
  bv.print_environment(env)
  names = args.only or list(PRIORS)
  rows = []
  print(f"\n== prior training steps, {args.dtype}, random codes "
        f"(JAX FLOPs: XLA cost analysis incl. Adam; torch: FlopCounterMode conv/matmul) ==")
  for name in names:
    benches = build(name, args)
    big = name == "imagenet_top"
    steps = args.imagenet_steps if big else args.steps
    warmup = args.imagenet_warmup if big else args.warmup
    times = bv.interleaved({b.name: b.train for b in benches}, steps, warmup)
    group = []
    for b in benches:
      t = statistics.median(times[b.name])
      group.append(dict(name=b.name, framework=b.framework, grid=b.grid, batch=b.batch,
                        params=b.params, compile_s=b.compile_s, s_per_step=t,
                        latents_per_s=b.latents / t, flops=b.flops, widths=b.widths,
                        ema=b.ema, seconds=times[b.name], steps=steps, warmup=warmup))
    print_rows(group)
    if len(group) == 2:
      tr, jr = group
      print(f"ratio {jr['name']} / {tr['name']}: {jr['latents_per_s'] / tr['latents_per_s']:.2f}x "
            f"latents/s (params {jr['params'] / tr['params']:.3f}x)")
    print("seconds per step: " + "; ".join(
        f"{r['name']} " + ",".join(f"{x:.2f}" for x in r["seconds"]) for r in group), flush=True)
    rows += group
    del benches
  env["load_avg_end"] = tuple(round(x, 2) for x in os.getloadavg())
  print(f"load average at end: {env['load_avg_end']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(environment=env, rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
