"""Shared config schema, `stage[,preset...]` parsing and validation.

Each file in `configs/` defines an experiment's values and calls `build(...)`; the
command line then selects a stage and presets: `--config=configs/demo.py:vqvae,tiny`.
All stages of one experiment share one config, so `sample` can rebuild the models that
`vqvae` and `prior_*` trained. Configs are locked: an unknown key fails at start.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections

from vqvae2_jax import registry
from vqvae2_jax.models.quantizer import CodebookOptions

DEFAULT_AXIS_RULES = (("batch", registry.MESH_AXES), ("mlp", registry.FSDP_AXIS),
                      ("embed", None), ("vocab", None), ("heads", None), ("classes", None),
                      ("kh", None), ("kw", None), ("layers", None), ("sublayers", None))
# Model fields whose value before they existed differs from today's default: a record
# written before the field keeps the behaviour it was trained with (Workdir.resolve_recorded).
LEGACY_RECORD_VALUES = {"scan_layers": False}


def train_config(**overrides) -> ml_collections.ConfigDict:
  """Optimisation and bookkeeping fields shared by every training stage."""
  c = ml_collections.ConfigDict(dict(
      batch_size=16, steps=1000, learning_rate=3e-4, warmup_steps=0, grad_clip_norm=0.0,
      weight_decay=0.0, param_ema_decay=0.0, log_every=50, eval_every=500,
      eval_batches=4, image_every=500, checkpoint_every=500, keep_checkpoints=3,
      dtype="float32",
      # Memory levers (no effect on parameters): microbatches per step (the update equals
      # one step on the whole batch) and rematerialisation of each residual / gated block.
      grad_accum_steps=1, remat=registry.REMAT_NONE,
      # Stage 1 only: warn when a level's code usage (fraction of K used in a batch) stays
      # below this for 3 consecutive logs (0 = never).
      usage_warning=0.1))
  c.update(overrides)
  return c


def prior_config(**overrides) -> ml_collections.ConfigDict:
  """A prior's architecture (see vqvae2_jax.models.prior for the mapping to the paper)
  plus its training fields."""
  c = ml_collections.ConfigDict(dict(
      hidden=512, res_hidden=2048, num_layers=20, attention_every=5, num_heads=8,
      kernel_size=5, dropout=0.1, attn_dropout=0.1, num_output_layers=0,
      num_cond_layers=0, class_conditional=True,
      # Classifier-free guidance: probability that training swaps a label for a learned
      # null label (0 = off; > 0 adds that label row, enabling sample.guidance != 1).
      label_dropout=0.0,
      # Each repeated stack (gated layers, output and conditioning blocks) as one scan
      # over stacked parameters: TPU compile time independent of depth (models/layer_scan.py).
      scan_layers=True,
      # 'paper' (models/prior.py) | 'public': the PixelSNAIL of the public PyTorch code
      # (models/public_pixelsnail.py, written by `python -m vqvae2_jax.import_torch`), whose
      # `num_layers` blocks hold `res_per_block` gated blocks each (unused by 'paper').
      architecture=registry.PAPER, res_per_block=4, train=train_config(
          batch_size=32, learning_rate=3e-4, param_ema_decay=0.999)))
  c.update(overrides)
  return c


def cpu_priors(top_train: ml_collections.ConfigDict,
               bottom_train: ml_collections.ConfigDict) -> dict:
  """Small two-level priors (8x8 top / 16x16 bottom maps of 64x64 images) for a CPU.

  Unrolled (scan_layers=False): at 4 layers compile time is no concern, and XLA:CPU runs
  the demo's top-prior train step 1.44x faster unrolled than scanned (fusion across
  layers, no per-layer slicing of stacked parameters).
  """
  return dict(
      top=prior_config(hidden=64, res_hidden=128, num_layers=4, attention_every=2,
                       num_heads=2, kernel_size=3, dropout=0.1, attn_dropout=0.1,
                       num_output_layers=2, scan_layers=False, train=top_train),
      bottom=prior_config(hidden=64, res_hidden=128, num_layers=4, attention_every=0,
                          num_heads=1, kernel_size=3, dropout=0.1, attn_dropout=0.0,
                          num_cond_layers=3, scan_layers=False, train=bottom_train))


def base_config() -> ml_collections.ConfigDict:
  """Every field any stage reads, with the paper's Table 5 stage-1 values."""
  c = ml_collections.ConfigDict()
  c.experiment = ""
  c.stage = registry.VQVAE
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      source="demo", image_size=64, root="", layout="classes", train_split=registry.TRAIN,
      val_split=registry.VAL, flat_val_count=1000, tfds_name="imagenet2012",
      tfds_data_dir="", on_bad_image="error", demo_train_size=2048, demo_val_size=64, seed=0,
      num_threads=4, worker_count=0))
  c.vqvae = ml_collections.ConfigDict(dict(
      num_levels=2, bottom_down=2, hidden=128, res_hidden=64, num_res_layers=2, num_codes=512,
      code_dim=64, beta=0.25, decay=0.99, epsilon=1e-5, dead_code_threshold=0.0,
      upsample="transpose",
      # Codebook options beyond the paper, at the paper's values (their meaning and the
      # values allowed: models/quantizer.CodebookOptions).
      **CodebookOptions.config_defaults(),
      # 'paper' | 'public': the public PyTorch code's VQ-VAE (models/public_vqvae.py; its top
      # encoder's first conv is half as wide), written by `python -m vqvae2_jax.import_torch`.
      architecture=registry.PAPER))
  c.vqvae_train = train_config(batch_size=128, steps=2_207_444)
  c.priors = ml_collections.ConfigDict()
  c.extract = ml_collections.ConfigDict(dict(batch_size=64, splits=registry.SPLITS))
  c.classifier = ml_collections.ConfigDict(dict(
      width=32, depth=2, input_pool=1, train=train_config(batch_size=64, steps=1000)))
  c.sample = ml_collections.ConfigDict(dict(
      num_images=16, batch_size=16, labels=(), temperature=1.0, top_k=0, top_p=1.0,
      sampler=registry.INCREMENTAL, seed=0,
      # Classifier-free guidance scale w: logits = l_uncond + w * (l_cond - l_uncond);
      # 1 = plain conditional sampling; != 1 needs priors trained with label_dropout > 0.
      guidance=1.0,
      rejection=ml_collections.ConfigDict(dict(
          classifier=registry.REJECT_NONE, keep_fraction=0.25, threshold=0.0, class_map=()))))
  # num_images: accepted samples per keep fraction (50,000 for published FID/IS).
  # Feature networks: Inception (FID/IS) and VGG-16 (precision/recall) from the given
  # paths or the default search; without them fallback_network ('efficientnet_lite0' or
  # 'none') stands in, labelled as not comparable with published numbers.
  # rejection_classifier '' follows sample.rejection.classifier. max_real_images /
  # mse_max_images / nll_max_batches cap the real data used (0 = the whole split);
  # pr_max_images caps the features kept per set for precision/recall. fid_method 'eigh'
  # (fast, same value) or 'sqrtm' (pytorch-fid's computation). rate_distortion_images:
  # validation images the codec is compared with JPEG / WebP on (0 = off).
  c.evaluate = ml_collections.ConfigDict(dict(
      num_images=512, batch_size=32, inception_weights="", vgg16_weights="",
      efficientnet_weights="", fallback_network="efficientnet_lite0",
      keep_fractions=(1.0, 0.5, 0.25), rejection_classifier="", seed=1,
      max_real_images=0, mse_max_images=10_000, nll_max_batches=0,
      pr_max_images=10_000, pr_k=3, is_splits=10, cas=True, fid_method="eigh",
      rate_distortion_images=0,
      # One more CAS classifier per trade-off point (keep fraction < 1, guidance scale).
      cas_per_point=False,
      # Classifier-free guidance scales evaluated beside the keep fractions (no rejection,
      # evaluate.num_images each); w != 1 needs priors trained with label_dropout > 0.
      guidance_scales=(1.0,)))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.axis_rules = DEFAULT_AXIS_RULES
  c.distributed = ml_collections.ConfigDict(dict(
      initialize=False, coordinator_address="", num_processes=0, process_id=-1))
  return c


class ConfigArgError(ValueError):
  """The config string after ':' names an unknown stage or preset."""


def parse_arg(arg: str | None, default_stage: str = registry.VQVAE) -> tuple[str, list[str]]:
  """'vqvae,tiny' -> ('vqvae', ['tiny'])."""
  parts = [p.strip() for p in (arg or default_stage).split(",") if p.strip()]
  return (parts[0], parts[1:]) if parts else (default_stage, [])


def build(experiment: str, arg: str | None,
          make: Callable[[], ml_collections.ConfigDict],
          presets: dict[str, Callable[[ml_collections.ConfigDict], None]]
          ) -> ml_collections.ConfigDict:
  """Builds the locked config of `experiment` for `arg` = 'stage[,preset...]'.

  An unknown stage or preset raises ConfigArgError, one line naming every stage and
  every preset of the experiment."""
  stage, names = parse_arg(arg)
  unknown = ([f"stage {stage!r}"] if stage not in registry.STAGES else []) + [
      f"preset {name!r}" for name in names if name not in presets]
  if unknown:
    raise ConfigArgError(
        f"unknown {' and '.join(unknown)} in {experiment}'s config string {arg!r} "
        f"('<stage>[,<preset>...]'); stages: {', '.join(registry.STAGES)}; presets: "
        f"{', '.join(sorted(presets)) or 'none'}")
  config = make()
  config.experiment, config.stage = experiment, stage
  for name in names:
    presets[name](config)
  config.lock()
  return config


def get_field(config: ml_collections.ConfigDict, dotted: str):
  """config['a']['b'] for dotted = 'a.b'."""
  for key in dotted.split("."):
    config = config[key]
  return config


def with_fields(config: ml_collections.ConfigDict, values: dict[str, Any]
                ) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields set ({'mesh.fsdp': 8}); existing keys only."""
  out = config.copy_and_resolve_references()
  for dotted, value in values.items():
    *parents, last = dotted.split(".")
    node = get_field(out, ".".join(parents)) if parents else out
    if last not in node:
      raise KeyError(f"config has no field {dotted!r}")
    with node.unlocked():
      node[last] = value
  return out


def prior_levels(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Level names top first, as the VQ-VAE of this config names them ('top', ['mid',]
  'bottom'; 'level<i>' beyond 3; `registry.level_names`)."""
  return registry.level_names(config.vqvae.num_levels)


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails early, naming the key, on values no stage could run with."""
  def bad(key, value, why):
    raise ValueError(f"config.{key}={value!r}: {why}")
  if config.stage not in registry.STAGES:
    bad("stage", config.stage, f"must be one of {registry.STAGES}")
  v = config.vqvae
  if v.num_levels < 1:
    bad("vqvae.num_levels", v.num_levels, "must be >= 1")
  if v.upsample not in registry.UPSAMPLE_MODES:
    bad("vqvae.upsample", v.upsample, f"must be one of {registry.UPSAMPLE_MODES}")
  if not 0 < v.decay < 1:
    bad("vqvae.decay", v.decay, "EMA decay must be in (0, 1)")
  for key in ("num_codes", "code_dim", "hidden", "res_hidden"):
    if v[key] < 1:
      bad(f"vqvae.{key}", v[key], "must be positive")
  if v.bottom_down < 1:
    bad("vqvae.bottom_down", v.bottom_down, "must be >= 1")
  for key, value, why in CodebookOptions.config_problems(v):
    bad(f"vqvae.{key}", value, why)
  if v.get("architecture", registry.PAPER) not in registry.ARCHITECTURES:
    bad("vqvae.architecture", v.architecture, f"must be one of {registry.ARCHITECTURES}")
  stride = 2**v.bottom_down * 2**(v.num_levels - 1)
  if config.data.image_size % stride:
    bad("data.image_size", config.data.image_size,
        f"must be divisible by {stride} for {v.num_levels} levels")
  if config.data.source not in registry.DATA_SOURCES:
    bad("data.source", config.data.source, f"must be one of {registry.DATA_SOURCES}")
  if config.data.source == "folder" and not config.data.root:
    bad("data.root", config.data.root, "set it to the image folder for data.source='folder'")
  if config.data.on_bad_image not in registry.ON_BAD_IMAGE:
    bad("data.on_bad_image", config.data.on_bad_image,
        f"must be one of {registry.ON_BAD_IMAGE}")
  levels = prior_levels(config)
  for name in config.priors:
    if name not in levels:
      bad(f"priors.{name}", "...", f"this VQ-VAE has levels {levels}")
  level = registry.prior_level(config.stage)
  if level is not None and level not in config.priors:
    bad("stage", config.stage, f"experiment has priors for {tuple(config.priors)}")
  for section in ["vqvae_train", "classifier.train"] + [f"priors.{p}.train" for p in config.priors]:
    t = get_field(config, section)
    if t.batch_size < 1 or t.steps < 0 or t.learning_rate <= 0:
      bad(f"{section}", "...", "batch_size >= 1, steps >= 0 and learning_rate > 0 are needed")
    if t.dtype not in registry.DTYPES:
      bad(f"{section}.dtype", t.dtype, f"must be one of {registry.DTYPES}")
    if t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
      bad(f"{section}.grad_accum_steps", t.grad_accum_steps,
          f"must be >= 1 and divide batch_size={t.batch_size}")
    if not 0 <= t.usage_warning <= 1:
      bad(f"{section}.usage_warning", t.usage_warning, "must be a fraction in [0, 1]")
    if t.remat not in registry.REMAT_MODES:
      bad(f"{section}.remat", t.remat, f"must be one of {registry.REMAT_MODES}")
  if config.classifier.input_pool < 1 or config.data.image_size % config.classifier.input_pool:
    bad("classifier.input_pool", config.classifier.input_pool,
        f"must be >= 1 and divide data.image_size={config.data.image_size}")
  for name in config.priors:
    p = config.priors[name]
    if not 0.0 <= p.get("label_dropout", 0.0) < 1.0:
      bad(f"priors.{name}.label_dropout", p.label_dropout, "must be in [0, 1)")
    if p.get("architecture", registry.PAPER) not in registry.ARCHITECTURES:
      bad(f"priors.{name}.architecture", p.architecture,
          f"must be one of {registry.ARCHITECTURES}")
    if p.get("label_dropout", 0.0) > 0 and not p.class_conditional:
      bad(f"priors.{name}.label_dropout", p.label_dropout,
          "needs class_conditional=True (it drops class labels)")
  if any(w < 0 for w in config.evaluate.get("guidance_scales", ())):
    bad("evaluate.guidance_scales", config.evaluate.guidance_scales,
        "each must be >= 0 (1 = no guidance)")
  if config.sample.get("guidance", 1.0) < 0:
    bad("sample.guidance", config.sample.guidance, "must be >= 0 (1 = no guidance)")
  if config.sample.sampler not in registry.SAMPLERS:
    bad("sample.sampler", config.sample.sampler, f"must be one of {registry.SAMPLERS}")
  if config.sample.rejection.classifier not in registry.REJECTION_KINDS:
    bad("sample.rejection.classifier", config.sample.rejection.classifier,
        f"must be one of {registry.REJECTION_KINDS}")
  if config.mesh.fsdp < 1 or (config.mesh.data < 1 and config.mesh.data != -1):
    bad("mesh", dict(config.mesh), "data is -1 (all devices) or >= 1, fsdp >= 1")


def _tiny(c: ml_collections.ConfigDict) -> None:
  """Shrinks any experiment so each stage runs in seconds on a CPU (tests, smoke checks)."""
  stride = 2**c.vqvae.bottom_down * 2**(c.vqvae.num_levels - 1)
  c.data.image_size = max(32, 2 * stride)
  c.data.demo_train_size = 64
  c.data.demo_val_size = 8
  c.data.flat_val_count = min(c.data.flat_val_count, 8)
  c.vqvae.update(dict(hidden=16, res_hidden=8, num_res_layers=1, num_codes=16,
                      code_dim=8, upsample="subpixel"))
  tiny_train = dict(batch_size=8, steps=4, log_every=2, eval_every=4, eval_batches=1,
                    image_every=4, checkpoint_every=2, warmup_steps=0)
  c.vqvae_train.update(tiny_train)
  c.classifier.update(dict(width=8, depth=1))
  c.classifier.train.update(tiny_train)
  for name in c.priors:
    c.priors[name].update(dict(
        hidden=16, res_hidden=16, num_layers=2, attention_every=min(
            c.priors[name].attention_every, 1), num_heads=2, kernel_size=3,
        num_output_layers=min(c.priors[name].num_output_layers, 1),
        num_cond_layers=min(c.priors[name].num_cond_layers, 1)))
    c.priors[name].train.update(tiny_train)
  c.extract.batch_size = 8
  c.sample.update(dict(num_images=4, batch_size=8))
  c.evaluate.update(dict(num_images=8, batch_size=8, keep_fractions=(1.0, 0.5),
                         pr_max_images=64))


def _bf16(c: ml_collections.ConfigDict) -> None:
  """bfloat16 compute (float32 params and losses) for every training stage."""
  c.vqvae_train.dtype = "bfloat16"
  for name in c.priors:
    c.priors[name].train.dtype = "bfloat16"


PRESETS = {"tiny": _tiny, "bf16": _bf16}
