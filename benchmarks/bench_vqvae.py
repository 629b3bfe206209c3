"""Stage-1 VQ-VAE-2 throughput: training, encoding and decoding images per second.

Times the real jitted train step (`vqvae2_jax.train.loop.make_train_step` with the stage's
loss) on random uint8 images, and jitted `model.encode` / `model.decode_codes`; prints the
parameter count and XLA's cost-analysis FLOPs per image. With `--torch` a PyTorch model of
the public architecture (benchmarks/torch_reference.py) with the same widths is timed in the
same process, interleaved with the JAX variants (A, B, A, B, ...; medians), never both at
once, and the JAX/PyTorch ratios are printed. `--peer-src PATH` adds the public code itself
(rosinality/vq-vae-2-pytorch's VQVAE imported unmodified from a checkout you give; skipped
when PATH holds no vqvae.py), and the ratios are then taken against it.

  python benchmarks/bench_vqvae.py --experiment demo --batch 16
  python benchmarks/bench_vqvae.py --experiment imagenet256 --batch 16 \
      --upsample transpose,subpixel --steps 3
  python benchmarks/bench_vqvae.py --match-torch-reference --image-size 256 --batch 16 \
      --upsample transpose,subpixel --torch --peer-src ~/src/vq-vae-2-pytorch

XLA flags are read from the environment only (e.g. `XLA_FLAGS=... python ...`); the
environment block at the top of the output shows which were set.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax import builders
from vqvae2_jax.train import losses
from vqvae2_jax.train import loop
from vqvae2_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# rosinality/vq-vae-2-pytorch's VQVAE() defaults (channel, n_res_channel, n_res_block,
# n_embed, embed_dim, decay) and its training recipe (Adam 3e-4, MSE + 0.25 latent loss).
TORCH_REFERENCE_WIDTHS = dict(num_levels=2, bottom_down=2, hidden=128, res_hidden=32,
                              num_res_layers=2, num_codes=512, code_dim=64, decay=0.99,
                              beta=0.25)
OPS = ("train", "encode", "decode")
PEER_NAME = "torch public code"  # the row of --peer-src's model


# ----------------------------------------------------------------------- shared helpers


def load_config(experiment: str, arg: str):
  """configs/<experiment>.py:get_config(arg), unlocked so the benchmark can override."""
  path = os.path.join(ROOT, "configs", f"{experiment}.py")
  if not os.path.exists(path):
    raise ValueError(f"no config {path}; --experiment must name a file in configs/")
  spec = importlib.util.spec_from_file_location(f"bench_configs_{experiment}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
  return config


def environment() -> dict[str, Any]:
  """Versions, CPU and load of this machine (printed above every table)."""
  env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             python=platform.python_version(), platform=platform.platform(),
             cpu=_cpu_name(), cpu_count=os.cpu_count(),
             cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count(),
             load_avg=tuple(round(x, 2) for x in os.getloadavg()),
             jax=jax.__version__, jaxlib=_version("jaxlib"), flax=flax.__version__,
             backend=jax.default_backend(), devices=jax.device_count(),
             xla_flags=os.environ.get("XLA_FLAGS", ""))
  torch = sys.modules.get("torch")
  if torch is not None:
    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  return env


def _version(name: str) -> str:
  try:
    return importlib.import_module(name).__version__
  except Exception:  # pylint: disable=broad-except
    return "?"


def _cpu_name() -> str:
  """'AMD EPYC (family 26 model 2, avx512)': VMs name the CPU vaguely, and XLA:CPU's
  kernels (and so the JAX/PyTorch ratios) differ between CPU generations."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "cpu family", "model", "flags"):
          info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  if "model name" not in info:
    return platform.processor() or "?"
  simd = "avx512" if "avx512f" in info.get("flags", "").split() else (
      "avx2" if "avx2" in info.get("flags", "").split() else "no-avx2")
  return (f"{info['model name']} (family {info.get('cpu family', '?')} model "
          f"{info.get('model', '?')}, {simd})")


def print_environment(env: dict[str, Any]) -> None:
  """Prints the versions, devices and flags the figures were measured with."""
  print("environment: " + " ".join(f"{k}={v}" for k, v in env.items() if k != "xla_flags"))
  print(f"XLA_FLAGS={env['xla_flags']!r}", flush=True)


def xla_flops(compiled) -> float | None:
  """Total FLOPs of a compiled executable from XLA's cost analysis (None if absent)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def compile_timed(fn: Callable, *args, **jit_kw):
  """(compiled executable, seconds to lower + compile)."""
  t = time.perf_counter()
  compiled = jax.jit(fn, **jit_kw).lower(*args).compile()
  return compiled, time.perf_counter() - t


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params))))


def init_train_state(init_variables, tx, use_ema: bool, seed: int = 0
                     ) -> state_lib.TrainState:
  """A single-device TrainState (same fields as the training loop's, no mesh)."""
  def make(key):
    k1, k2 = jax.random.split(key)
    variables = init_variables(k1)
    params = nn.unbox(variables["params"])
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        model_state=nn.unbox({k: v for k, v in variables.items() if k != "params"}),
        ema_params=params if use_ema else {}, rng=k2)
  key = jax.random.PRNGKey(seed)
  # Runs once: compiling without backend optimisation is much faster and costs nothing.
  return jax.jit(make).lower(key).compile(compiler_options=state_lib.FAST_COMPILE)(key)


def interleaved(fns: dict[str, Callable[[], None]], steps: int, warmup: int,
                pause: float = 0.05) -> dict[str, list[float]]:
  """Wall seconds of `steps` calls of each fn (each must block), taken in turns.

  Turns (A, B, A, B, ...) spread slow drifts of machine load over all variants; the short
  pause lets spinning worker threads of the previous framework go idle first.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      time.sleep(pause)
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


def fmt(x: float | None, spec: str = ".1f", width: int = 9) -> str:
  """x formatted right-aligned, '-' when missing."""
  return f"{'-' if x is None else format(x, spec):>{width}}"


def fmt_params(n: int | None) -> str:
  """A parameter count as '1.92M' ('-' when missing)."""
  return "-" if n is None else f"{n / 1e6:.2f}M"


# ----------------------------------------------------------------------- JAX variant


class JaxVQVAEBench:
  """Compiled train step, encoder and decoder of one JAX VQ-VAE config."""

  def __init__(self, config, name: str, batch: int, image_size: int, dtype, seed: int = 0,
               ops=OPS):
    self.name, self.batch, self.framework = name, batch, "jax"
    self.upsample = config.vqvae.upsample
    model = builders.build_vqvae(config, dtype)
    t = config.vqvae_train
    tx = state_lib.make_optimizer(t)
    step = loop.make_train_step(losses.vqvae_loss_fn(model, config.vqvae.beta), tx,
                                t.param_ema_decay)
    self.state = init_train_state(builders.vqvae_init_fn(model, image_size), tx,
                                  t.param_ema_decay > 0, seed)
    self.params = count_params(self.state.params)
    images = np.random.default_rng(seed).integers(0, 256, (batch, image_size, image_size, 3),
                                                  dtype=np.uint8)
    self.batch_arrays = {"image": jax.device_put(images)}
    # Only the requested ops are compiled (a 256x256 train step takes a minute to build).
    self.compile_s = {op: None for op in OPS}
    self.flops = {op: None for op in OPS}
    compiled = {}
    if "train" in ops:
      compiled["train"], self.compile_s["train"] = compile_timed(
          step, self.state, self.batch_arrays, donate_argnums=0)
      self._train = compiled["train"]

    def encode(variables, x):
      return model.apply(variables, image_lib.to_model(x), method=model.encode)

    def decode(variables, codes):
      return model.apply(variables, codes, method=model.decode_codes)

    variables = self.variables()
    if "encode" in ops or "decode" in ops:
      compiled["encode"], self.compile_s["encode"] = compile_timed(
          encode, variables, self.batch_arrays["image"])
      self._encode = compiled["encode"]
      self.codes = jax.block_until_ready(self._encode(variables, self.batch_arrays["image"]))
    if "decode" in ops:
      compiled["decode"], self.compile_s["decode"] = compile_timed(decode, variables,
                                                                   self.codes)
      self._decode = compiled["decode"]
    for op, c in compiled.items():
      f = xla_flops(c)
      self.flops[op] = None if f is None else f / batch

  def variables(self):
    return {"params": self.state.params, **self.state.model_state}

  def train(self) -> None:
    self.state, metrics = self._train(self.state, self.batch_arrays)
    jax.block_until_ready(metrics["loss"])

  def encode(self) -> None:
    self.codes = jax.block_until_ready(self._encode(self.variables(), self.batch_arrays["image"]))

  def decode(self) -> None:
    jax.block_until_ready(self._decode(self.variables(), self.codes))


# ----------------------------------------------------------------------- PyTorch variant


def load_peer_vqvae(path: str):
  """The `VQVAE` class of a rosinality/vq-vae-2-pytorch checkout, imported unmodified.

  path: the checkout's root (holding vqvae.py and its distributed/ package, which vqvae.py
  imports as a top-level module). Returns None, with a note, when it holds no vqvae.py.
  """
  source = os.path.join(path, "vqvae.py")
  if not os.path.isfile(source):
    print(f"--peer-src {path!r} holds no vqvae.py: the public model is skipped "
          "(clone rosinality/vq-vae-2-pytorch and pass its root)", flush=True)
    return None
  sys.path.insert(0, os.path.abspath(path))  # vqvae.py does `import distributed`
  try:
    spec = importlib.util.spec_from_file_location("peer_vqvae", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(os.path.abspath(path))
  return module.VQVAE


class TorchVQVAEBench:
  """A PyTorch VQ-VAE-2 with the same widths, same batch, Adam, fp32: by default
  torch_reference.TorchVQVAE, or `model_cls` (the public code's VQVAE, same constructor
  keywords and encode / decode_code / forward signatures)."""

  def __init__(self, v, name: str, batch: int, image_size: int, lr: float, threads: int,
               seed: int = 0, model_cls=None):
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference as ref  # pylint: disable=g-import-not-at-top
    if v.num_levels != 2 or v.bottom_down != 2:
      raise ValueError("the PyTorch models have exactly 2 levels with a x4 bottom encoder; "
                       f"got num_levels={v.num_levels}, bottom_down={v.bottom_down}. Use "
                       "--experiment demo/imagenet256 or --match-torch-reference.")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    self.torch, self.ref = torch, ref
    self.name, self.batch, self.framework, self.upsample = name, batch, "torch", "transpose"
    self.model = (model_cls or ref.TorchVQVAE)(
        in_channel=3, channel=v.hidden, n_res_block=v.num_res_layers,
        n_res_channel=v.res_hidden, embed_dim=v.code_dim, n_embed=v.num_codes, decay=v.decay)
    self.beta = v.beta
    self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
    self.params = ref.num_params(self.model)
    images = np.random.default_rng(seed).integers(0, 256, (batch, image_size, image_size, 3),
                                                  dtype=np.uint8)
    self.images = torch.from_numpy(images)
    self.compile_s = {op: None for op in OPS}
    self.flops = self._count_flops()
    self.encode()

  def _x(self, images=None):
    """uint8 NHWC -> float NCHW in [-1, 1] (inside the timed region, as JAX's step)."""
    images = self.images if images is None else images
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

  def _count_flops(self) -> dict[str, float | None]:
    """Conv/matmul FLOPs per image (torch's FlopCounterMode, one image)."""
    try:
      from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    except ImportError:
      return {op: None for op in OPS}
    x = self._x(self.images[:1])
    flops = {}
    with FlopCounterMode(display=False) as counter:
      self.ref.vqvae_loss(self.model, x, self.beta).backward()
    flops["train"] = float(counter.get_total_flops())
    self.model.zero_grad(set_to_none=True)
    self.model.eval()
    with self.torch.inference_mode():
      with FlopCounterMode(display=False) as counter:
        codes = self.model.encode(x)[3:]
      flops["encode"] = float(counter.get_total_flops())
      with FlopCounterMode(display=False) as counter:
        self.model.decode_code(*codes)
      flops["decode"] = float(counter.get_total_flops())
    return flops

  def train(self) -> None:
    self.model.train()
    self.opt.zero_grad(set_to_none=True)
    loss = self.ref.vqvae_loss(self.model, self._x(), self.beta)
    loss.backward()
    self.opt.step()

  def encode(self) -> None:
    self.model.eval()
    with self.torch.inference_mode():
      self.codes = self.model.encode(self._x())[3:]

  def decode(self) -> None:
    self.model.eval()
    with self.torch.inference_mode():
      self.model.decode_code(*self.codes)


# ----------------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags (see --help)."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--experiment", default="demo", help="configs/<name>.py: demo | "
                  "imagenet256 | ffhq1024")
  ap.add_argument("--presets", default="", help="comma-separated config presets, e.g. tiny")
  ap.add_argument("--batch", type=int, default=None, help="default: vqvae_train.batch_size")
  ap.add_argument("--image-size", type=int, default=None, help="default: data.image_size")
  ap.add_argument("--upsample", default=None,
                  help="comma-separated JAX variants: transpose (paper), subpixel, resize; "
                       "default: the config's")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "config"),
                  help="compute dtype ('config' = vqvae_train.dtype)")
  ap.add_argument("--match-torch-reference", action="store_true",
                  help="set the widths of the public PyTorch model (channel 128, res 32, "
                       "2 res blocks, K 512, D 64, 2 levels)")
  ap.add_argument("--torch", action="store_true", help="also time the PyTorch reference")
  ap.add_argument("--peer-src", default="", metavar="PATH",
                  help="root of a rosinality/vq-vae-2-pytorch checkout: also time its VQVAE, "
                       "imported unmodified (skipped when PATH holds no vqvae.py); the "
                       "ratios are then taken against it")
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--ops", default="train,encode,decode")
  ap.add_argument("--steps", type=int, default=5, help="timed calls per op and variant")
  ap.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
  ap.add_argument("--json", default="", help="also write the results to this file")
  return ap.parse_args(argv)


def build_variants(args, ops) -> tuple[list[Any], dict[str, Any]]:
  """The models to compare (ours per upsampling mode, the PyTorch reference) and the setup."""
  arg = ",".join(["vqvae"] + [p for p in args.presets.split(",") if p])
  config = load_config(args.experiment, arg)
  if args.match_torch_reference:
    beta = TORCH_REFERENCE_WIDTHS["beta"]
    config.vqvae.update({k: v for k, v in TORCH_REFERENCE_WIDTHS.items() if k != "beta"})
    config.vqvae.beta = beta
    config.vqvae_train.update(dict(learning_rate=3e-4, warmup_steps=0, grad_clip_norm=0.0,
                                   weight_decay=0.0, param_ema_decay=0.0))
  batch = args.batch or config.vqvae_train.batch_size
  size = args.image_size or config.data.image_size
  modes = [m for m in (args.upsample or config.vqvae.upsample).split(",") if m]
  dtype = (config.vqvae_train.dtype if args.dtype == "config" else args.dtype)
  v = config.vqvae
  setup = dict(experiment=args.experiment, presets=args.presets, batch=batch, image_size=size,
               dtype=dtype, matched=args.match_torch_reference,
               widths=dict(hidden=v.hidden, res_hidden=v.res_hidden,
                           num_res_layers=v.num_res_layers, num_codes=v.num_codes,
                           code_dim=v.code_dim, num_levels=v.num_levels,
                           bottom_down=v.bottom_down))
  variants = []
  torch_kw = dict(lr=config.vqvae_train.learning_rate, threads=args.torch_threads)
  # Built before the JAX variants compile so torch's thread pool is set up once.
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  peer_cls = load_peer_vqvae(args.peer_src) if args.peer_src else None
  if peer_cls is not None:
    variants.append(TorchVQVAEBench(v, PEER_NAME, batch, size, model_cls=peer_cls, **torch_kw))
  if args.torch:
    variants.append(TorchVQVAEBench(v, "torch (public arch)", batch, size, **torch_kw))
  for mode in modes:
    config.vqvae.upsample = mode
    variants.append(JaxVQVAEBench(config, f"jax {mode}", batch, size, parallel.to_dtype(dtype),
                                  ops=ops))
  return variants, setup


def measure(variants, ops, steps: int, warmup: int) -> list[dict[str, Any]]:
  """Times every op of every variant, interleaved so load changes hit them alike."""
  rows = [dict(name=v.name, framework=v.framework, upsample=v.upsample, params=v.params,
               batch=v.batch,
               flops_per_image=v.flops, compile_s=v.compile_s, seconds={}, per_sec={})
          for v in variants]
  for op in ops:
    times = interleaved({v.name: getattr(v, op) for v in variants}, steps, warmup)
    for row, v in zip(rows, variants):
      row["seconds"][op] = times[v.name]
      row["per_sec"][op] = v.batch / statistics.median(times[v.name])
  for row in rows:
    for op in OPS:
      row["per_sec"].setdefault(op, None)
  return rows


def print_table(rows, setup, ops, steps: int) -> None:
  """Prints images/s per op and variant with the ratios to the reference."""
  s = setup
  print(f"\n== stage 1: {s['experiment']}{'+' + s['presets'] if s['presets'] else ''}"
        f"{' (matched to the PyTorch reference)' if s['matched'] else ''}, "
        f"{s['image_size']}x{s['image_size']}, batch {s['batch']}, {s['dtype']}, "
        f"median of {steps} ==")
  print("widths: " + ", ".join(f"{k}={v}" for k, v in s["widths"].items()))
  w = 14 if len(ops) == 1 else 9  # a single column must still fit its group's label
  head = (f"{'variant':<22}{'upsample':>10}{'params':>9} |" + "".join(f"{o:>{w}}" for o in ops)
          + " |" + "".join(f"{o:>{w}}" for o in ops) + " |" + "".join(f"{o:>{w}}" for o in ops))
  print(f"{'':<41} |{'images / s':^{w * len(ops)}} |{'GFLOP / image':^{w * len(ops)}} |"
        f"{'compile s':^{w * len(ops)}}")
  print(head)
  print("-" * len(head))
  for r in rows:
    print(f"{r['name']:<22}{r['upsample']:>10}{fmt_params(r['params']):>9} |"
          + "".join(fmt(r["per_sec"][o], ".2f" if r["per_sec"][o] < 10 else ".1f", w)
                    for o in ops) + " |"
          + "".join(fmt(None if r["flops_per_image"][o] is None
                        else r["flops_per_image"][o] / 1e9, ".2f", w) for o in ops) + " |"
          + "".join(fmt(r["compile_s"][o], ".1f", w) for o in ops))
  torch_rows = [r for r in rows if r["framework"] == "torch"]
  if torch_rows:
    t = torch_rows[0]  # the public code itself when --peer-src gave it
    for r in rows:
      if r is not t:
        print(f"ratio {r['name']} / {t['name']}: " + "  ".join(
            f"{o} {r['per_sec'][o] / t['per_sec'][o]:.2f}x" for o in ops)
            + f"   (params {r['params'] / t['params']:.3f}x)")
    fastest = lambda r, o: r["batch"] / min(r["seconds"][o])
    print("fastest-call ratios (the least disturbed call of each; load only adds time): "
          + "; ".join(f"{r['name']} " + " ".join(
              f"{o} {fastest(r, o) / fastest(t, o):.2f}x" for o in ops)
                      for r in rows if r is not t))
    print("GFLOP: JAX = XLA cost analysis of the compiled program (all ops, incl. Adam); "
          "torch = FlopCounterMode (conv/matmul only).")
  print("seconds per call: " + "; ".join(
      f"{r['name']} {o} " + ",".join(f"{x:.3f}" for x in r["seconds"][o])
      for r in rows for o in ops), flush=True)


def main(argv=None) -> list[dict[str, Any]]:
  """Builds, measures and prints; returns the rows."""
  args = parse_args(argv)
  ops = [o for o in args.ops.split(",") if o]
  for o in ops:
    if o not in OPS:
      raise ValueError(f"unknown op {o!r}; choose from {OPS}")
  variants, setup = build_variants(args, ops)
  env = environment()
  print_environment(env)
  rows = measure(variants, ops, args.steps, args.warmup)
  print_table(rows, setup, ops, args.steps)
  env["load_avg_end"] = tuple(round(x, 2) for x in os.getloadavg())
  print(f"load average at end: {env['load_avg_end']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(environment=env, setup=setup, rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
