"""The programs each stage runs, built from a config with abstract inputs only.

Each `Program` is what a stage jits on its devices: the train step exactly as
`train/loop.py` builds it (same loss, optimizer, parameter EMA, gradient accumulation,
remat, fsdp shardings, donated state, activation-sharding rules), extract's encoder, the
incremental sampler's loop per level, and evaluate's feature network. Inputs are
`jax.ShapeDtypeStruct`s carrying `NamedSharding`s on a mesh of any devices (TPU
compile-only devices in `vqvae2_jax.compile`), so nothing is allocated.

Without a workdir the extraction manifest is derived from the config: the level shapes of
stage 1 and the class count of the data set (`num_classes`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vqvae2_jax import builders
from vqvae2_jax import config_lib
from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax import registry
from vqvae2_jax.eval import convert
from vqvae2_jax.models import vqvae as vqvae_lib
from vqvae2_jax.sampling import incremental
from vqvae2_jax.train import losses
from vqvae2_jax.train import state as state_lib
from vqvae2_jax.train import step as step_lib

@dataclasses.dataclass
class Program:
  """One jitted program with abstract (sharded) arguments.

  Attributes:
    name: e.g. 'train prior_top', 'encoder', 'sampler top', 'features inception'.
    jitted: the jax.jit-wrapped function.
    args: abstract arguments (ShapeDtypeStruct with shardings).
    examples: global images (or latents) one call processes.
    unit: 'images' or 'latents'.
    levers: the train step's remat / grad_accum_steps / fsdp (report.LEVER_KEYS; empty for
      other programs).
    model_fn: the same computation without rematerialisation (model FLOPs), or None when
      the program recomputes nothing.
    context: entered around tracing: the program's mesh and logical axis rules
      (`parallel.use_mesh`), as the stage running it enters them.
  """
  name: str
  jitted: Any
  args: tuple
  examples: int
  unit: str
  levers: dict = dataclasses.field(default_factory=dict)
  model_fn: Callable | None = None
  context: Callable[[], Any] = contextlib.nullcontext


def manifest_from_config(config, num_classes: int) -> dict:
  """The extraction manifest stage 1 of `config` would write (shapes, K, classes)."""
  shapes = builders.code_shapes(config)
  return {"levels": list(shapes), "shapes": {k: list(v) for k, v in shapes.items()},
          "num_codes": int(config.vqvae.num_codes), "num_classes": int(num_classes)}


def _abstract(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, shardings)


def _train_parts(config, stage: str, manifest: dict, remat: str):
  """(init_variables, loss_fn, finalize_state, batch shapes, train section, examples,
  unit) of a training stage with `remat`."""
  if stage == registry.VQVAE:
    config = config_lib.with_fields(config, {"vqvae_train.remat": remat})
    t = config.vqvae_train
    model = builders.build_vqvae(config)
    size = config.data.image_size
    accumulate = t.grad_accum_steps > 1
    loss = losses.vqvae_loss_fn(model, config.vqvae.beta, deferred_codebooks=accumulate)
    finalize = vqvae_lib.finalize_codebooks(model) if accumulate else None
    return (builders.vqvae_init_fn(model, size), loss, finalize,
            {"image": ((size, size, 3), jnp.uint8)}, t, t.batch_size, "images")
  level = registry.prior_level(stage)
  config = config_lib.with_fields(config, {f"priors.{level}.train.remat": remat})
  t = config.priors[level].train
  prior = builders.build_prior(config, level, manifest)
  _, upper, _ = builders.prior_level_info(manifest, level)
  shapes = {n: (tuple(manifest["shapes"][n]), jnp.int32) for n in upper + (level,)}
  if prior.num_classes:
    shapes["label"] = ((), jnp.int32)
  h, w = manifest["shapes"][level]
  return (builders.prior_init_fn(prior, manifest, level),
          losses.prior_loss_fn(prior, level, upper), None, shapes, t, t.batch_size * h * w,
          "latents")


def _mesh_context(config, devices) -> Callable[[], Any]:
  """A context factory entering the config's mesh over `devices` and its logical axis
  rules (`parallel.use_mesh`): each program is built and traced inside it, as the stage
  that runs the program enters it (`runner.run_stage`)."""
  mesh = parallel.make_mesh(config.mesh, devices)
  return lambda: parallel.use_mesh(mesh, config.axis_rules)


def train_program(config, stage: str, devices, manifest: dict) -> Program:
  """The train step of `stage` ('vqvae' or 'prior_<level>') with the config's levers."""
  on_mesh = _mesh_context(config, devices)
  with on_mesh():
    return _train_program(config, stage, manifest, on_mesh)


def _train_program(config, stage: str, manifest: dict, on_mesh) -> Program:
  t = (config.vqvae_train if stage == registry.VQVAE else
       config.priors[registry.prior_level(stage)].train)
  init, loss, finalize, shapes, t, examples, unit = _train_parts(config, stage, manifest,
                                                                 t.remat)
  tx = state_lib.make_optimizer(t)
  _, abstract, shardings = state_lib.plan_state(init, tx, t.param_ema_decay > 0)
  batch_sharding = parallel.batch_sharding()
  state = _abstract(abstract, shardings)
  batch = {k: jax.ShapeDtypeStruct((t.batch_size,) + s, d, sharding=batch_sharding)
           for k, (s, d) in shapes.items()}
  jitted = step_lib.jit_train_step(loss, tx, t, shardings, batch_sharding, finalize)
  model_fn = None
  if t.remat != registry.REMAT_NONE:
    _, plain_loss, plain_finalize, *_ = _train_parts(config, stage, manifest,
                                                     registry.REMAT_NONE)
    model_fn = step_lib.make_train_step(plain_loss, tx, t.param_ema_decay,
                                        t.grad_accum_steps, plain_finalize)
  return Program(f"train {stage}", jitted, (state, batch), examples, unit,
                 levers={"remat": t.remat, "grad_accum_steps": t.grad_accum_steps,
                         "fsdp": int(config.mesh.fsdp)},
                 model_fn=model_fn, context=on_mesh)


def _abstract_key() -> jax.ShapeDtypeStruct:
  """A PRNG key by shape only: programs are built under their mesh, whose (topology)
  devices hold no data, so nothing may be computed eagerly."""
  return jax.eval_shape(jax.random.key, 0)


def _replicated_params(init):
  """Abstract variables of init(rng), replicated on the ambient mesh (inference
  programs)."""
  plain = parallel.unboxed(jax.eval_shape(init, _abstract_key()))
  return _abstract(plain, jax.tree.map(lambda _: parallel.replicated(), plain))


def encoder_program(config, devices) -> Program:
  """Extract's encoder: uint8 images [extract.batch_size, S, S, 3] -> codes per level."""
  on_mesh = _mesh_context(config, devices)
  with on_mesh():
    model = builders.build_vqvae(config)
    size, batch = config.data.image_size, config.extract.batch_size
    variables = _replicated_params(builders.vqvae_init_fn(model, size))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8,
                                  sharding=parallel.batch_sharding())

    def encode(v, x):
      return model.apply(v, image_lib.to_model(x), method=model.encode)
    jitted = jax.jit(encode, out_shardings=parallel.batch_sharding())
    return Program("encoder", jitted, (variables, images), batch, "images", context=on_mesh)


def sampler_program(config, level: str, devices, manifest: dict) -> Program:
  """The incremental sampler's loop for `level` at sample.batch_size (one call draws the
  whole [B, H, W] map, conditioned on the levels above and a class)."""
  on_mesh = _mesh_context(config, devices)
  with on_mesh():
    return _sampler_program(config, level, manifest, on_mesh)


def _sampler_program(config, level: str, manifest: dict, on_mesh) -> Program:
  prior = builders.build_prior(config, level, manifest)
  params = _replicated_params(builders.prior_init_fn(prior, manifest, level))["params"]
  b = config.sample.batch_size
  _, upper, _ = builders.prior_level_info(manifest, level)
  batch_sharding = parallel.batch_sharding()
  cond = tuple(jax.ShapeDtypeStruct((b, *manifest["shapes"][u]), jnp.int32,
                                    sharding=batch_sharding) for u in upper)
  labels = (jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)
            if prior.num_classes else None)
  h, w = manifest["shapes"][level]

  def sample(p, rng, cond_codes, labels_):
    return incremental.sample_incremental(
        prior, p, rng, shape=(b, h, w), cond_codes=cond_codes, labels=labels_,
        temperature=config.sample.temperature, top_k=config.sample.top_k,
        top_p=config.sample.top_p, guidance=config.sample.guidance, sharding=batch_sharding)
  rng = jax.ShapeDtypeStruct((), _abstract_key().dtype, sharding=parallel.replicated())
  return Program(f"sampler {level}", jax.jit(sample), (params, rng, cond, labels),
                 b * h * w, "latents", context=on_mesh)


def feature_program(config, devices, name: str = "inception") -> Program:
  """Evaluate's feature network `name` on uint8 images [evaluate.batch_size, S, S, 3]."""
  on_mesh = _mesh_context(config, devices)
  with on_mesh():
    spec = convert.get_spec(name)
    model = spec.make_model()
    size, batch = config.data.image_size, config.evaluate.batch_size
    variables = _replicated_params(
        lambda rng: model.init(rng, jnp.zeros((1, size, size, 3), jnp.uint8)))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8,
                                  sharding=parallel.batch_sharding())
    return Program(f"features {name}", jax.jit(model.apply), (variables, images), batch,
                   "images", context=on_mesh)


def stage_programs(config, stage: str, devices, num_classes: int) -> list[Program]:
  """Every program `stage` compiles ('pipeline': all stages' programs)."""
  manifest = manifest_from_config(config, num_classes)
  levels = registry.level_names(config.vqvae.num_levels)
  out = []
  everything = stage == registry.PIPELINE
  if everything or stage == registry.VQVAE:
    out.append(train_program(config, registry.VQVAE, devices, manifest))
  if everything or stage == registry.EXTRACT:
    out.append(encoder_program(config, devices))
  for level in levels:
    if (everything or stage == registry.prior_stage(level)) and level in config.priors:
      out.append(train_program(config, registry.prior_stage(level), devices, manifest))
  for level in levels:
    if (everything or stage == registry.SAMPLE) and level in config.priors:
      out.append(sampler_program(config, level, devices, manifest))
  if everything or stage == registry.EVALUATE:
    out.append(feature_program(config, devices))
  if not out:
    raise ValueError(f"the compile check has no program for stage {stage!r}; use vqvae, "
                     "extract, prior_<level>, sample, evaluate or pipeline")
  return out
