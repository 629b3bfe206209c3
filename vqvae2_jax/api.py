"""A trained run as an object: `run = vqvae2_jax.load(workdir)`.

  run = vqvae2_jax.load("runs/demo")
  codes = run.encode(images)                 # uint8 [B, S, S, 3] -> (top [B,h,w], ..., bottom)
  pixels = run.decode(codes)                 # -> uint8 [B, S, S, 3]
  recon = run.reconstruct(images, levels=("top",))   # the paper's Figure 3, one subset
  samples = run.sample(16, labels=[0, 1], temperature=0.9, seed=0)   # uint8 [16, S, S, 3]
  probs = run.classify(images)               # [B, C], when a classifier was trained
  streams = run.compress(images)             # one bytes stream per image (vqvae2_jax.codec)
  same = run.decompress(streams)             # == run.reconstruct(images), bit for bit
  bits = run.log_prob(images)["bits"]        # code length of the latents, not of pixels

Every model is rebuilt from the model fields the workdir recorded (`Workdir`), and only
parameters are restored (`restore`). Each component loads on first use; a method whose
stage has not run says which stage to run. Images are uint8 NumPy arrays [B, H, W, 3];
codes are tuples of int32 arrays, top level first.

A Run keeps its device mesh: each public method that runs device work enters it with the
config's logical axis rules (`parallel.use_mesh`, via `_on_mesh`), so a notebook calls
them without any context and the library below reads the ambient mesh.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vqvae2_jax import builders
from vqvae2_jax import config_lib
from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax import restore
from vqvae2_jax import codec as codec_lib
from vqvae2_jax.eval.feature_networks import load_feature_network
from vqvae2_jax.sampling import scorers
from vqvae2_jax.sampling.hierarchical import HierarchicalSampler, SampleOptions
from vqvae2_jax.registry import (CLASSIFIER, EFFICIENTNET_LITE0, EXTRACT, REJECT_TRAINED,
                                 VQVAE, prior_stage)
from vqvae2_jax.workdir import StageMissingError, Workdir


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples configs use (axis rules, label lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def recorded_run_config(workdir: Workdir) -> ml_collections.ConfigDict:
  """The config of a workdir rebuilt from its records alone (no command line).

  Starts from the newest-written stage record that holds a whole config, then overlays
  the model fields of every trained stage.
  """
  for stage in (VQVAE, EXTRACT, CLASSIFIER):
    record = workdir.recorded_config(stage)
    if record is not None:
      break
  else:
    raise StageMissingError(f"{workdir.path} holds no recorded stage config: train the "
                            "vqvae stage into it first (or check the path)")
  config = ml_collections.ConfigDict(_tuples(record))
  config.lock()
  return workdir.resolve_recorded(config)


def load(workdir: str, *, config: ml_collections.ConfigDict | None = None,
         mesh: Mesh | None = None) -> "Run":
  """The trained run in `workdir`, its models rebuilt from what the workdir recorded.

  Args:
    workdir: the experiment directory the stages wrote.
    config: optional config of the caller (e.g. a stage's); its model fields are
      replaced by the recorded ones. Default: the recorded config itself.
    mesh: device mesh for every call (default: the ambient one, e.g. a stage's, else a
      new one from config.mesh: all devices on the 'data' axis by default).
  """
  w = Workdir(workdir)
  config = recorded_run_config(w) if config is None else w.resolve_recorded(config)
  if mesh is None:
    mesh = (parallel.current_mesh() if parallel.mesh_is_set()
            else parallel.make_mesh(config.mesh))
  return Run(w, config, mesh)


def _on_mesh(method):
  """`method` of a Run, run inside the Run's mesh and axis rules (`parallel.use_mesh`);
  entering them again from a method it calls changes nothing."""
  @functools.wraps(method)
  def on_mesh(self, *args, **kwargs):
    with parallel.use_mesh(self.mesh, self.config.axis_rules):
      return method(self, *args, **kwargs)
  return on_mesh


class Run:
  """Models of a workdir, loaded on first use, with batched NumPy in / NumPy out calls.

  Attributes:
    workdir: the Workdir. config: the resolved config (recorded model fields).
    mesh: the device mesh every call shards its batch over (entered by each method).
  """

  def __init__(self, workdir: Workdir, config: ml_collections.ConfigDict, mesh: Mesh):
    self.workdir, self.config, self.mesh = workdir, config, mesh
    self._priors: dict[str, tuple[Any, Any]] = {}

  def __repr__(self) -> str:
    trained = [s for s in (VQVAE, *map(prior_stage, self.level_names), CLASSIFIER)
               if self.workdir.has_checkpoint(s)]
    return f"Run({self.workdir.path!r}, trained={trained})"

  # ------------------------------------------------------------------ models
  @property
  def level_names(self) -> tuple[str, ...]:
    """Level names, top first."""
    return config_lib.prior_levels(self.config)

  @functools.cached_property
  @_on_mesh
  def _vqvae(self) -> tuple[Any, dict, int]:
    model = builders.build_vqvae(self.config)
    variables, step = restore.restore_inference_variables(
        self.workdir, VQVAE, builders.vqvae_init_fn(model, self.config.data.image_size))
    return model, variables, step

  @property
  def vqvae(self) -> tuple[Any, dict]:
    """(VQVAE2 module, variables) of stage 1's latest checkpoint."""
    return self._vqvae[:2]

  @property
  def vqvae_step(self) -> int:
    """The training step of the loaded stage-1 checkpoint."""
    return self._vqvae[2]

  @functools.cached_property
  def manifest(self) -> dict:
    """The extraction manifest (levels, code shapes, num_codes, classes)."""
    return self.workdir.manifest()

  @property
  def num_classes(self) -> int:
    """Classes of the data the codes were extracted from (0 when unlabelled)."""
    return int(self.manifest.get("num_classes", 0))

  @property
  def class_names(self) -> list[str]:
    return list(self.manifest.get("class_names", []))

  def has(self, stage: str) -> bool:
    """Whether `stage` ('vqvae', 'prior_top', 'classifier', ...) has a checkpoint."""
    return self.workdir.has_checkpoint(stage)

  @_on_mesh
  def prior(self, level: str) -> tuple[Any, Any]:
    """(PixelSNAILPrior, params) of a level's prior: its parameter EMA when kept."""
    if level in self._priors:
      return self._priors[level]
    if level not in self.config.priors:
      raise ValueError(f"this experiment defines priors for {tuple(self.config.priors)}, "
                       f"not {level!r}")
    prior = builders.build_prior(self.config, level, self.manifest)
    variables, _ = restore.restore_inference_variables(
        self.workdir, prior_stage(level), builders.prior_init_fn(prior, self.manifest, level))
    self._priors[level] = prior, variables["params"]
    return self._priors[level]

  @property
  def priors(self) -> dict[str, tuple[Any, Any]]:
    """level -> (prior, params) for every extracted level, top first."""
    return {level: self.prior(level) for level in self.manifest["levels"]}

  @functools.cached_property
  @_on_mesh
  def classifier(self) -> tuple[Any, Any]:
    """(ResNetClassifier, params) of the classifier stage."""
    classes = self.workdir.recorded_classes(CLASSIFIER)
    model = builders.build_classifier(self.config, classes["num_classes"])
    variables, _ = restore.restore_inference_variables(
        self.workdir, CLASSIFIER,
        builders.classifier_init_fn(model, self.config.data.image_size))
    return model, variables["params"]

  @_on_mesh
  def sampler(self, options: SampleOptions | None = None) -> HierarchicalSampler:
    """An ancestral sampler over stage 1 and every prior (options from config.sample);
    it splits its batches over this Run's mesh."""
    s = self.config.sample
    options = options or SampleOptions(temperature=s.temperature, top_k=s.top_k,
                                       top_p=s.top_p, sampler=s.sampler,
                                       batch_size=s.batch_size,
                                       guidance=s.get("guidance", 1.0))
    model, variables = self.vqvae
    shapes = {l: tuple(self.manifest["shapes"][l]) for l in self.manifest["levels"]}
    return HierarchicalSampler(model, variables, self.priors, shapes, options)

  @_on_mesh
  def scorer(self, kind: str = REJECT_TRAINED, batch_size: int = 32) -> scorers.Scorer:
    """Class probabilities of images for rejection sampling: 'trained' (the classifier
    stage) or 'efficientnet_lite0' (ImageNet classes)."""
    batch_size = _round_up(batch_size, self.mesh.size)
    if kind == REJECT_TRAINED:
      model, params = self.classifier
      return scorers.classifier_scorer(model, params, batch_size)
    if kind == EFFICIENTNET_LITE0:
      apply_fn, variables, info = load_feature_network(
          EFFICIENTNET_LITE0, self.config.evaluate.efficientnet_weights or None)
      return scorers.network_scorer(apply_fn, variables, info["logits_key"],
                                    batch_size)
    raise ValueError(f"unknown scorer {kind!r}: use {REJECT_TRAINED!r} or "
                     f"{EFFICIENTNET_LITE0!r}")

  # ------------------------------------------------------------------ calls
  def _batched(self, fn, arrays: Sequence[np.ndarray], batch_size: int | None = None):
    """fn(*global batches) over fixed-size, mesh-sharded batches; outputs concatenated."""
    n = len(arrays[0])
    batch = _round_up(batch_size or min(max(n, 1), self.config.extract.batch_size),
                      self.mesh.size)
    outs = []
    for lo in range(0, n, batch):
      chunk = [np.asarray(a[lo:lo + batch]) for a in arrays]
      pad = batch - len(chunk[0])
      chunk = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)]) for c in chunk]
      # Every process holds the whole chunk (on many processes each feeds its devices' rows).
      sharding = parallel.batch_sharding()
      out = fn(*(parallel.shared_to_global(c, sharding) for c in chunk))
      outs.append(jax.tree.map(lambda x: parallel.global_to_host(x)[:batch - pad], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    size = self.config.data.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [B, {size}, {size}, 3] (the size stage 1 was "
                       f"trained at), got {images.dtype} {images.shape}")
    return images

  @functools.cached_property
  def _encode_fn(self):
    model, variables = self.vqvae
    return jax.jit(lambda x: model.apply(variables, image_lib.to_model(x),
                                         method=model.encode))

  @functools.cached_property
  def _decode_fn(self):
    model, variables = self.vqvae
    return jax.jit(lambda codes, use: model.apply(variables, codes, use,
                                                  method=model.decode_codes),
                   static_argnums=1)

  @_on_mesh
  def encode(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """uint8 [B, S, S, 3] -> codes, top first: int32 [B, H_l, W_l] per level."""
    return tuple(self._batched(self._encode_fn, [self._check_images(images)]))

  @_on_mesh
  def decode(self, codes: Sequence[np.ndarray], levels: Iterable[str] | None = None
             ) -> np.ndarray:
    """Codes (top first) -> uint8 [B, S, S, 3]; `levels` keeps only those levels' codes
    (the others contribute nothing, as in the paper's Figure 3)."""
    names = self.level_names
    codes = [np.asarray(c, np.int32) for c in codes]
    if len(codes) != len(names):
      raise ValueError(f"expected codes for the {len(names)} levels {names}, got {len(codes)}")
    use = tuple(True for _ in names) if levels is None else tuple(n in set(levels) for n in names)
    unknown = set(levels or ()) - set(names)
    if unknown:
      raise ValueError(f"unknown levels {sorted(unknown)}; this model has {names}")
    pixels = self._batched(lambda *c: self._decode_fn(tuple(c), use), codes)
    return image_lib.to_uint8(pixels)

  @_on_mesh
  def reconstruct(self, images: np.ndarray, levels: Iterable[str] | None = None
                  ) -> np.ndarray:
    """uint8 [B, S, S, 3] -> their reconstructions from all (or the given) levels."""
    return self.decode(self.encode(images), levels)

  @_on_mesh
  def sample(self, num: int, labels: Sequence[int] | int | None = None, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             batch_size: int | None = None, return_codes: bool = False,
             guidance: float = 1.0):
    """`num` generated images, uint8 [num, S, S, 3] (and codes with return_codes).

    guidance: classifier-free guidance scale (1 = off; see SampleOptions).
    labels: the classes to generate for class-conditional priors, cycled to num
      (default: every class in turn); ignored for unconditional priors.
    """
    batch = _round_up(batch_size or min(num, self.config.sample.batch_size), self.mesh.size)
    sampler = self.sampler(SampleOptions(temperature=temperature, top_k=top_k, top_p=top_p,
                                         sampler=self.config.sample.sampler, batch_size=batch,
                                         guidance=guidance))
    label_arr = self.sample_labels(num, labels, sampler.num_classes)
    result = sampler.generate(num, label_arr, seed, progress=False)
    if return_codes:
      return result["image"], tuple(result[l] for l in sampler.levels)
    return result["image"]

  def sample_labels(self, num: int, labels, num_classes: int) -> np.ndarray | None:
    """`labels` (an int, a sequence, or None = every class in turn) cycled to `num`."""
    if not num_classes:
      return None
    chosen = (tuple(range(num_classes)) if labels is None or (not np.isscalar(labels)
                                                               and len(labels) == 0)
              else (labels,) if np.isscalar(labels) else tuple(labels))
    bad = [int(c) for c in chosen if not 0 <= int(c) < num_classes]
    if bad:
      raise ValueError(f"labels {bad} are not classes of this model (0..{num_classes - 1})")
    return np.resize(np.asarray(chosen, np.int32), num)

  @_on_mesh
  def classify(self, images: np.ndarray) -> np.ndarray:
    """float32 [B, C] class probabilities from the classifier stage's model."""
    if not self.has(CLASSIFIER):
      raise StageMissingError(f"no classifier in {self.workdir.path}: run the classifier "
                              "stage first")
    images = self._check_images(images)
    return self.scorer(REJECT_TRAINED,
                       batch_size=self.config.classifier.train.batch_size)(images)

  # ------------------------------------------------------------------ codec
  def _model_record(self) -> dict:
    """The recorded model fields the codec's fingerprint covers (training fields out)."""
    c = self.config.to_dict()
    m = self.manifest
    return {"vqvae": c["vqvae"], "image_size": c["data"]["image_size"],
            "priors": {l: {k: v for k, v in c["priors"][l].items() if k != "train"}
                       for l in m["levels"]},
            "levels": m["levels"], "shapes": m["shapes"], "num_codes": m["num_codes"],
            "num_classes": m.get("num_classes", 0)}

  @functools.cached_property
  @_on_mesh
  def codec(self) -> codec_lib.CodecModels:
    """The entropy codec's models: every prior, code shapes, and the models' fingerprint
    (recorded model config + checksum of the stage-1 variables and prior params)."""
    priors = self.priors
    fp = codec_lib.fingerprint(self._model_record(),
                               [self.vqvae[1]] + [params for _, params in priors.values()])
    return codec_lib.CodecModels(
        priors=priors, shapes={l: tuple(self.manifest["shapes"][l]) for l in priors},
        image_size=self.config.data.image_size, num_codes=int(self.manifest["num_codes"]),
        fingerprint=fp, batch_size=self.config.sample.batch_size)

  @functools.cached_property
  def _level_bits_fn(self):
    return codec_lib.make_level_bits_fn(self.priors)

  def _code_length(self, codes: Sequence[np.ndarray], labels) -> dict:
    num_classes = max(p.num_classes for p, _ in self.priors.values())
    per_label = lambda lab: self._batched(self._level_bits_fn, [*codes, lab])
    return codec_lib.code_length(per_label, len(codes[0]), levels=self.level_names,
                                 labels=labels, num_classes=num_classes,
                                 image_size=self.config.data.image_size)

  @_on_mesh
  def log_prob(self, images: np.ndarray, labels: Sequence[int] | int | None = None) -> dict:
    """Code length in bits of the images' latents under the priors (vqvae2_jax.codec).

    This is -log2 p(codes) of the images' stage-1 codes: the size of the *lossy
    latents* the codec stores, not a likelihood of the pixels (images with equal codes
    get equal values). One teacher-forced pass per level. With class-conditional priors
    and labels=None it is the code length under a uniform mixture over classes (one pass
    per class), and 'label' is the most likely class.

    Returns:
      {'bits': float64 [B], 'levels': {level: float64 [B]}, 'bits_per_pixel' (per S*S),
       'bits_per_dim' (per 3*S*S), 'label': int32 [B] or None}.
    """
    return self._code_length(self.encode(images), labels)

  @_on_mesh
  def compress(self, images: np.ndarray, labels: Sequence[int] | int | None = None, *,
               batch_size: int | None = None) -> list[bytes]:
    """uint8 [B, S, S, 3] -> B streams (bytes): every level's codes range-coded under its
    prior. Class-conditional priors code each image under `labels` (default: its
    cheapest class, which the stream records)."""
    codes = self.encode(images)
    if self.codec.conditional and labels is None:
      labels = self._code_length(codes, None)["label"]
    streams, _ = codec_lib.compress_codes(self.codec, codes, labels, batch_size=batch_size)
    return streams

  @_on_mesh
  def decompress(self, streams: Sequence[bytes], *, names: Sequence[str] | None = None,
                 return_codes: bool = False):
    """Streams of `compress` -> uint8 [B, S, S, 3], identical to `reconstruct` of the
    compressed images (and (images, codes, labels) with return_codes). Streams of other
    models, truncated or corrupted ones raise codec.StreamError naming the stream."""
    codes, labels = codec_lib.decompress_codes(self.codec, streams, names)
    images = self.decode(codes)
    return (images, codes, labels) if return_codes else images


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-int(n) // multiple) * multiple)
