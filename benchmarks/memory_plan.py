r"""Memory plan: per-device bytes of every paper train step, compiled, nothing allocated.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/memory_plan.py --mesh data=8
  python benchmarks/memory_plan.py --mesh data=1          # one device (e.g. one H200)

For each paper train step (imagenet256 stage 1 at batch 128, its top / bottom priors at
1024 / 512; ffhq1024 stage 1 at 128 and its top / mid / bottom priors at 1024 / 512 / 256)
the real update (train/step.py: loss, gradients, Adam, parameter EMA, donated state) is
lowered with abstract inputs (jax.ShapeDtypeStruct with shardings) and compiled for the mesh;
`compiled.memory_analysis()` gives the per-device argument, output, alias and temporary
bytes. peak ~ argument + output - alias + temp. Levers: remat none / block, fsdp 1 / 8
(parameters and optimizer state sharded over the 'fsdp' axis) and gradient accumulation
1 / N (N microbatches per step). On CPU the figures are XLA:CPU's buffer assignment, an
estimate of an accelerator's (its fusion and scheduling differ); benchmarks/accelerator.py
prints the same plan next to a GPU's measured peak to calibrate it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vqvae2_jax import builders  # noqa: E402
from vqvae2_jax import config_lib  # noqa: E402
from vqvae2_jax import parallel  # noqa: E402
from vqvae2_jax import registry  # noqa: E402
from vqvae2_jax.aot.programs import manifest_from_config  # noqa: E402
from vqvae2_jax.models import fast_conv  # noqa: E402
from vqvae2_jax.models import vqvae as vqvae_lib  # noqa: E402
from vqvae2_jax.train import losses  # noqa: E402
from vqvae2_jax.train import state as state_lib  # noqa: E402
from vqvae2_jax.train import step as step_lib  # noqa: E402

DEVICE_GB = (16, 32, 80, 141)
USABLE = 0.9  # of a device's memory left to one program (runtime, fragmentation)
# Compiling without LLVM optimisation is several times faster on CPU; buffer assignment
# (what memory_analysis reports) comes from the HLO pipeline, which still runs. XLA:CPU's
# cse_barrier_expander drops jax.checkpoint's optimization barriers and CSEs the recomputed
# forward away (remat would change nothing on CPU); accelerators keep them, so it is off.
COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                   "xla_disable_hlo_passes": "cse_barrier_expander"}
NOTE = ("Per-device bytes from XLA:CPU's buffer assignment on fake devices: an estimate of "
        "an accelerator's (fusion, layout and scheduling differ; the programs are the "
        "accelerator ones, without the CPU-only im2col gradients); calibrate with "
        "benchmarks/accelerator.py on the device.")
# (experiment, stage, level or None). Batches are the configs' (= the paper's).
PAPER_STEPS = (("imagenet256", "vqvae", None), ("imagenet256", "prior", "top"),
               ("imagenet256", "prior", "bottom"), ("ffhq1024", "vqvae", None),
               ("ffhq1024", "prior", "top"), ("ffhq1024", "prior", "mid"),
               ("ffhq1024", "prior", "bottom"))
PLANNED_CLASSES = 1000  # class-conditional priors are planned with ImageNet's label count


def plan_accelerator_programs() -> None:
  """Makes the models build the programs an accelerator runs: XLA's own convolution
  gradients, not the CPU-only im2col kernel gradient (whose [B*H*W, kh*kw*C] patches would
  dominate a CPU plan)."""
  fast_conv.fast_gradient_pays = lambda in_channels, out_channels: False


def load_config(experiment: str, arg: str = "vqvae"):
  """configs/<experiment>.py:get_config(arg)."""
  path = os.path.join(ROOT, "configs", f"{experiment}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{experiment}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@dataclasses.dataclass
class Step:
  """A train step to plan: its loss, init function, finalize and abstract batch."""
  name: str
  batch_size: int
  train: object  # the train_config section
  init_variables: object
  loss_fn: object
  batch_shapes: dict  # name -> (shape without batch, dtype)
  finalize_state: object = None


def vqvae_step(config, remat: str) -> Step:
  """Stage 1 of `config` (built by `builders`, the stage's loss): MSE + beta * commitment,
  EMA codebooks deferred to 'vq_batch' and applied once per step."""
  config = config_lib.with_fields(config, {"vqvae_train.remat": remat})
  t, size = config.vqvae_train, config.data.image_size
  model = builders.build_vqvae(config)
  return Step(registry.VQVAE, t.batch_size, t, builders.vqvae_init_fn(model, size),
              losses.vqvae_loss_fn(model, config.vqvae.beta, deferred_codebooks=True),
              {"image": ((size, size, 3), jnp.uint8)}, vqvae_lib.finalize_codebooks(model))


def prior_step(config, level: str, remat: str) -> Step:
  """The prior of `level` (built by `builders`, the stage's loss): cross-entropy over
  codes shaped like extracted ones, PLANNED_CLASSES labels when class-conditional. Its
  repeated stacks run under nn.scan (models/layer_scan.py) when the config scans them,
  so the full depth compiles in about the time of one layer."""
  config = config_lib.with_fields(config, {f"priors.{level}.train.remat": remat})
  manifest = manifest_from_config(config, PLANNED_CLASSES)
  prior = builders.build_prior(config, level, manifest)
  _, upper, _ = builders.prior_level_info(manifest, level)
  batch_shapes = {n: (tuple(manifest["shapes"][n]), jnp.int32) for n in upper + (level,)}
  if prior.num_classes:
    batch_shapes["label"] = ((), jnp.int32)
  t = config.priors[level].train
  return Step(registry.prior_stage(level), t.batch_size, t,
              builders.prior_init_fn(prior, manifest, level),
              losses.prior_loss_fn(prior, level, upper), batch_shapes)


def make_step(config, stage: str, level, remat: str) -> Step:
  """vqvae_step or prior_step."""
  if stage == registry.VQVAE:
    return vqvae_step(config, remat)
  return prior_step(config, level, remat)


def make_mesh(devices, fsdp: int):
  """('data', 'fsdp') mesh over `devices` with the given fsdp size."""
  return parallel.make_mesh(type("M", (), {"data": len(devices) // fsdp, "fsdp": fsdp}),
                            devices)


def divisible_shardings(abstract, shardings):
  """Replicates the leaves whose sharded axis does not divide (e.g. a 3-channel RGB output
  kernel over fsdp=8), which the logical rules alone would reject (ambient mesh)."""
  replicated = parallel.replicated()

  def fix(leaf, sharding):
    try:
      sharding.shard_shape(leaf.shape)
      return sharding
    except ValueError:
      return replicated
  return jax.tree.map(fix, abstract, shardings)


def compile_step(step: Step, mesh, accum: int, axis_rules, batch_size: int | None = None,
                 compiler_options=COMPILE_OPTIONS):
  """(compiled train step, (make_state, shardings), abstract batch) for `mesh`; nothing is
  allocated. compiler_options: COMPILE_OPTIONS for XLA:CPU plans, None on accelerators.
  Planned and traced inside `parallel.use_mesh(mesh, axis_rules)`, as a stage runs it."""
  with parallel.use_mesh(mesh, axis_rules):
    return _compile_step(step, accum, batch_size or step.batch_size, compiler_options)


def _compile_step(step: Step, accum: int, batch_size: int, compiler_options):
  """`compile_step` on the ambient mesh."""
  tx = state_lib.make_optimizer(step.train)
  use_ema = step.train.param_ema_decay > 0
  make_state, abstract, shardings = state_lib.plan_state(step.init_variables, tx, use_ema)
  shardings = divisible_shardings(abstract, shardings)
  state = state_lib.abstract_with_shardings(abstract, shardings)
  batch_sharding = parallel.batch_sharding()
  batch = {k: jax.ShapeDtypeStruct((batch_size,) + s, d, sharding=batch_sharding)
           for k, (s, d) in step.batch_shapes.items()}
  fn = step_lib.make_train_step(step.loss_fn, tx, step.train.param_ema_decay, accum,
                                step.finalize_state)
  jitted = jax.jit(fn, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)
  compiled = jitted.lower(state, batch).compile(compiler_options=compiler_options)
  return compiled, (make_state, shardings), batch


def memory_row(compiled) -> dict:
  """Per-device bytes of a compiled program and the estimated peak."""
  m = compiled.memory_analysis()
  row = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
  return finish_row(row)


def finish_row(row: dict) -> dict:
  """Adds the estimated peak and the device sizes it fits."""
  row["peak"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
  row["fits_gb"] = [g for g in DEVICE_GB if row["peak"] <= USABLE * g * 1e9]
  return row


def planned_bytes(config, stage, level, remat, mesh, accum, axis_rules) -> dict:
  """Per-device bytes of one program, compiled at full depth."""
  return memory_row(compile_step(make_step(config, stage, level, remat), mesh, accum,
                                 axis_rules)[0])


def plan(step_list, devices, grid, axis_rules, log=print) -> list[dict]:
  """Compiles every (step, remat, fsdp, accum) of `grid` and returns one row per program.

  grid: callable (global batch, number of devices) -> list of (remat, fsdp, accum).
  """
  rows = []
  for experiment, config, stage, level in step_list:
    base = make_step(config, stage, level, "none")
    for remat, fsdp, accum in grid(base.batch_size, len(devices)):
      start = time.time()
      mesh = make_mesh(devices, fsdp)
      row = {"experiment": experiment, "step": base.name, "batch": base.batch_size,
             "remat": remat, "fsdp": fsdp, "accum": accum,
             "per_device_batch": base.batch_size // len(devices),
             "per_device_micro": base.batch_size // len(devices) // accum}
      try:
        row.update(planned_bytes(config, stage, level, remat, mesh, accum, axis_rules))
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      row["compile_s"] = time.time() - start
      rows.append(row)
      log(format_row(row))
  return rows


def default_grid(batch: int, num_devices: int):
  """Levers worth comparing (compile time bounds the grid): plain; remat; and, where the
  per-device batch allows, accumulation down to a per-device microbatch of 8 with remat,
  then also with fsdp."""
  per_device = batch // num_devices
  fsdp = min(8, num_devices)
  accum = max(1, per_device // 8)
  grid = [("none", 1, 1), ("block", 1, 1)]
  if accum > 1:
    grid.append(("block", 1, accum))
  if fsdp > 1:
    grid.append(("block", fsdp, accum))
  return grid


def gb(x) -> str:
  return f"{x / 1e9:8.2f}"


HEADER = (f"{'experiment':<12} {'step':<13} {'batch':>5} {'dev_b':>5} {'micro':>5} "
          f"{'remat':<5} {'fsdp':>4} {'accum':>5} {'arg_GB':>8} {'out_GB':>8} "
          f"{'temp_GB':>8} {'peak_GB':>8}  {'fits (GB)':<13} {'compile_s':>9}")


def format_row(r: dict) -> str:
  """One table line."""
  head = (f"{r['experiment']:<12} {r['step']:<13} {r['batch']:>5} {r['per_device_batch']:>5} "
          f"{r['per_device_micro']:>5} {r['remat']:<5} {r['fsdp']:>4} {r['accum']:>5} ")
  if "error" in r:
    return head + f"error: {r['error']}"
  fits = ",".join(map(str, r["fits_gb"])) or "none"
  return (head + f"{gb(r['argument'])} {gb(r['output'])} {gb(r['temp'])} {gb(r['peak'])}  "
          f"{fits:<13} {r['compile_s']:9.1f}")


def parse_mesh(text: str) -> int:
  """'data=8' or 'data=2,fsdp=4' -> the number of devices it names."""
  total = 1
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    if name not in registry.MESH_AXES or not value.isdigit() or int(value) < 1:
      raise SystemExit(f"--mesh {text!r}: use axis=size pairs of 'data' and 'fsdp', "
                       "e.g. --mesh data=8")
    total *= int(value)
  return total


def paper_steps(which: str = "all", preset: str = ""):
  """[(experiment, config, stage, level)] of the paper's seven train steps."""
  out = []
  for experiment, stage, level in PAPER_STEPS:
    name = stage if level is None else f"{stage}_{level}"
    if which != "all" and name not in which.split(",") and experiment not in which.split(","):
      continue
    arg = registry.VQVAE if stage == registry.VQVAE else registry.prior_stage(level)
    out.append((experiment, load_config(experiment, arg + preset), stage, level))
  return out


def main(argv=None) -> list[dict]:
  """Prints the plan table (see the module docstring) and returns its rows."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mesh", default="data=8", help="devices to plan for, e.g. data=8")
  ap.add_argument("--steps", default="all",
                  help="comma list of experiments or steps (vqvae, prior_top, ...)")
  ap.add_argument("--tiny", action="store_true", help="the configs' tiny preset (tests)")
  args = ap.parse_args(argv)
  num = parse_mesh(args.mesh)
  devices = jax.devices()
  if len(devices) < num:
    raise SystemExit(f"--mesh {args.mesh} needs {num} devices, JAX sees {len(devices)}; on "
                     f"CPU set XLA_FLAGS=--xla_force_host_platform_device_count={num}")
  start = time.time()
  plan_accelerator_programs()
  print(NOTE)
  print(f"{num} x {devices[0].device_kind} ({devices[0].platform}); peak = arg + out - alias"
        f" + temp; fits = peak <= {USABLE:.0%} of the device; load {os.getloadavg()}",
        flush=True)
  print(HEADER, flush=True)
  steps = paper_steps(args.steps, ",tiny" if args.tiny else "")
  rows = plan(steps, devices[:num], default_grid, steps[0][1].axis_rules if steps else None,
              log=lambda line: print(line, flush=True))
  print(f"planned {len(rows)} programs in {time.time() - start:.0f} s; load "
        f"{os.getloadavg()}")
  return rows


if __name__ == "__main__":
  main()
