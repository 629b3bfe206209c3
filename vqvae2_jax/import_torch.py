r"""Imports the public PyTorch VQ-VAE-2 checkpoints (rosinality/vq-vae-2-pytorch) into a workdir.

  python -m vqvae2_jax.import_torch --vqvae=vqvae_560.pt \
      [--prior-top=pixelsnail_top_420.pt --prior-bottom=pixelsnail_bottom_420.pt] \
      --workdir=W [--image-size=256]

writes a workdir like the stages write (recorded configs, orbax checkpoints with
checksums, the code shapes in extract/manifest.json), so `vqvae2_jax.load(W)` encodes,
decodes and reconstructs, and with priors samples (`sample.sampler='reference'` runs them),
computes `log_prob`; the extract and prior_<level> stages run on W as on any workdir
(a prior stage on an imported prior fine-tunes it).

The files are read by `eval.torch_pickle` (no torch, nothing in them executed): the
VQ-VAE's state dict (`vqvae_560.pt` is one) and `train_pixelsnail.py` checkpoints
{'model': state_dict, 'args': Namespace} ('args' read as a plain dict of values). The
architecture's sizes are read from the tensors' shapes; the models are the 'public'
variants (models/public_vqvae.py, models/public_pixelsnail.py), and every parameter and
buffer is checked against them by name and shape before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqvae2_jax import builders
from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import config_lib
from vqvae2_jax import registry
from vqvae2_jax import storage
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.eval import convert
from vqvae2_jax.eval import torch_pickle
from vqvae2_jax.models import public_pixelsnail
from vqvae2_jax.train import state as state_lib

PUBLIC_LEVELS = registry.level_names(2)  # the public VQ-VAE's two levels, top first
PUBLIC_NUM_HEADS = 8  # CausalAttention's default, which PixelBlock never changes
PUBLIC_DEFAULT_DROPOUT = 0.1  # train_pixelsnail.py's --dropout default (files without args)
Transform = Callable[[np.ndarray], np.ndarray]


class TorchImportError(ValueError):
  """A file is not a checkpoint of the public architecture (one-line message)."""


def _conv(w: np.ndarray) -> np.ndarray:        # [O, I, kh, kw] -> [kh, kw, I, O]
  return w.transpose(2, 3, 1, 0)


def _conv_t(w: np.ndarray) -> np.ndarray:      # ConvTranspose2d [I, O, kh, kw] -> flipped
  return w.transpose(2, 3, 0, 1)[::-1, ::-1]


def _same(w: np.ndarray) -> np.ndarray:
  return w


def read_checkpoint(path: str, what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, args) of a public checkpoint: a bare state dict, or {'model': ...,
  'args': ...} as train_pixelsnail.py saves. Keys lose 'module.'; weight norm written
  by torch.nn.utils.parametrizations is renamed to weight_g / weight_v."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} does not exist; expected {what}")
  try:
    obj = torch_pickle.load(path)
  except torch_pickle.TorchFileError as e:
    raise TorchImportError(f"{e} (expected {what})") from None
  args = {}
  if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
    args = obj.get("args") if isinstance(obj.get("args"), dict) else {}
    obj = obj["model"]
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise TorchImportError(f"{path!r} holds no state dict of tensors; expected {what}")
  sd = {}
  for key, value in obj.items():
    key = key[len("module."):] if key.startswith("module.") else key
    key = key.replace(".parametrizations.weight.original0", ".weight_g").replace(
        ".parametrizations.weight.original1", ".weight_v")
    sd[key] = np.asarray(value, np.float32) if value.dtype.kind == "f" or str(
        value.dtype) == "bfloat16" else value
  return sd, args


def _count(sd: dict, pattern: str) -> int:
  """How many consecutive i make `pattern.format(i)` a key of sd."""
  n = 0
  while pattern.format(n) in sd:
    n += 1
  return n


def _need(sd: dict, key: str, source: str) -> np.ndarray:
  if key not in sd:
    raise TorchImportError(f"{source} has no {key!r}: not a state dict of the public "
                       "VQ-VAE-2 code's model")
  return sd[key]


# ----------------------------------------------------------------------------- VQ-VAE


def vqvae_fields(sd: dict, source: str) -> dict[str, int]:
  """The VQ-VAE's sizes from its tensors: hidden, res_hidden, num_res_layers, num_codes,
  code_dim (vqvae config fields)."""
  code_dim, num_codes = _need(sd, "quantize_t.embed", source).shape
  n_res = 0  # ResBlocks follow the encoder's five first layers: enc_b.blocks.5, 6, ...
  while f"enc_b.blocks.{5 + n_res}.conv.1.weight" in sd:
    n_res += 1
  hidden = _need(sd, "enc_b.blocks.2.weight", source).shape[0]
  res_hidden = sd["enc_b.blocks.5.conv.1.weight"].shape[0] if n_res else 1
  return dict(hidden=int(hidden), res_hidden=int(res_hidden), num_res_layers=n_res,
              num_codes=int(num_codes), code_dim=int(code_dim))


def _res_stack(prefix: str, first: int, n: int, target: tuple) -> dict:
  out = {}
  for r in range(n):
    for j, layer in enumerate((1, 3)):
      for leaf, tf in (("kernel", _conv), ("bias", _same)):
        torch_leaf = "weight" if leaf == "kernel" else "bias"
        out[target + ("ResidualStack_0", f"Conv_{2 * r + j}", leaf)] = (
            f"{prefix}.{first + r}.conv.{layer}.{torch_leaf}", tf)
  return out


def _layer(target: tuple, key: str, transposed: bool = False) -> dict:
  return {target + ("kernel",): (f"{key}.weight", _conv_t if transposed else _conv),
          target + ("bias",): (f"{key}.bias", _same)}


def vqvae_mapping(n: int, code_dim: int) -> dict[tuple, tuple[str, Transform]]:
  """Flax path ('params' | 'vq_stats', ...) -> (torch key, transform) for n res blocks."""
  m = {}
  enc_b, enc_t = ("params", "encoders_1"), ("params", "encoders_0")
  for i, idx in enumerate((0, 2, 4)):
    m.update(_layer(enc_b + (f"Conv_{i}",), f"enc_b.blocks.{idx}"))
  m.update(_res_stack("enc_b.blocks", 5, n, enc_b))
  for i, idx in enumerate((0, 2)):
    m.update(_layer(enc_t + (f"Conv_{i}",), f"enc_t.blocks.{idx}"))
  m.update(_res_stack("enc_t.blocks", 3, n, enc_t))
  m.update(_layer(("params", "pre_quant_0"), "quantize_conv_t"))
  dec_t = ("params", "cond_decoders_0")
  m.update(_layer(dec_t + ("Conv_0",), "dec_t.blocks.0"))
  m.update(_res_stack("dec_t.blocks", 1, n, dec_t))
  m.update(_layer(dec_t + ("Upsample2x_0", "ConvTranspose_0"), f"dec_t.blocks.{n + 2}", True))
  # The public conv sees [dec_t(q_t) (D), enc_b (C)]; VQVAE2 concatenates [enc_b, dec_t].
  swap = lambda w: _conv(np.concatenate([w[:, code_dim:], w[:, :code_dim]], axis=1))
  m[("params", "pre_quant_1", "kernel")] = ("quantize_conv_b.weight", swap)
  m[("params", "pre_quant_1", "bias")] = ("quantize_conv_b.bias", _same)
  m.update(_layer(("params", "to_bottom_0_0", "ConvTranspose_0"), "upsample_t", True))
  dec = ("params", "decoder")
  m.update(_layer(dec + ("Conv_0",), "dec.blocks.0"))
  m.update(_res_stack("dec.blocks", 1, n, dec))
  m.update(_layer(dec + ("Upsample2x_0", "ConvTranspose_0"), f"dec.blocks.{n + 2}", True))
  m.update(_layer(dec + ("Upsample2x_1", "ConvTranspose_0"), f"dec.blocks.{n + 4}", True))
  for level, name in ((0, "quantize_t"), (1, "quantize_b")):
    q = ("vq_stats", f"quantizers_{level}")
    m[q + ("codebook",)] = (f"{name}.embed", lambda w: w.T)
    m[q + ("ema_count",)] = (f"{name}.cluster_size", _same)
    m[q + ("ema_sum",)] = (f"{name}.embed_avg", lambda w: w.T)
  return m


# ----------------------------------------------------------------------------- PixelSNAIL


def pixelsnail_fields(sd: dict, args: dict, source: str) -> dict[str, Any]:
  """The prior config fields of a public PixelSNAIL from its tensors (and its 'args' for
  the dropout, which no tensor holds), plus 'shape' (H, W) and 'num_codes'."""
  horizontal = _need(sd, "horizontal.conv.conv.weight_v", source)
  hidden, num_codes = horizontal.shape[:2]
  blocks = _count(sd, "blocks.{}.resblocks.0.conv1.conv.conv.weight_v")
  res = _count(sd, "blocks.0.resblocks.{}.conv1.conv.conv.weight_v")
  if not blocks or not res:
    raise TorchImportError(f"{source} has no PixelBlock with causal gated blocks: not a "
                       "public PixelSNAIL")
  first = sd["blocks.0.resblocks.0.conv1.conv.conv.weight_v"]
  cond_layers = 0  # cond_resnet.blocks.0 is its first conv, its gated blocks follow
  while f"cond_resnet.blocks.{cond_layers + 1}.conv1.conv.weight_v" in sd:
    cond_layers += 1
  if cond_layers and sd["cond_resnet.blocks.0.conv.weight_v"].shape[0] != first.shape[0]:
    raise TorchImportError(f"{source}: its conditioning width differs from res_channel; "
                       "train_pixelsnail.py sets cond_res_channel=n_res_channel, the only "
                       "layout imported")
  if cond_layers and sd["cond_resnet.blocks.0.conv.weight_v"].shape[2] != 3:
    raise TorchImportError(f"{source}: cond_res_kernel must be 3 (train_pixelsnail.py's)")
  dropout = float(args.get("dropout", PUBLIC_DEFAULT_DROPOUT))
  attention = "blocks.0.key_resblock.conv1.conv.weight_v" in sd
  background = _need(sd, "background", source)
  shape = tuple(int(s) for s in background.shape[2:])
  want = np.asarray(public_pixelsnail.background(*shape)).transpose(2, 0, 1)[None]
  if background.shape != want.shape or not np.allclose(background, want, atol=1e-6):
    raise TorchImportError(f"{source}: its 'background' buffer is not the public code's "
                       "coordinate channels")
  return dict(
      fields=dict(architecture=registry.PUBLIC, hidden=int(hidden), res_hidden=int(first.shape[0]),
                  num_layers=blocks, res_per_block=res, kernel_size=int(first.shape[-1]),
                  attention_every=int(attention), num_heads=PUBLIC_NUM_HEADS,
                  dropout=dropout, attn_dropout=dropout if attention else 0.0,
                  num_output_layers=_count(sd, "out.{}.conv1.conv.weight_v"),
                  num_cond_layers=cond_layers, class_conditional=False, label_dropout=0.0),
      shape=shape, num_codes=int(num_codes))


def _pixelsnail_key(path: tuple[str, ...], num_output_layers: int) -> str:
  """Torch key of a PublicPixelSNAIL parameter path ('blocks_0', ..., 'v' | 'g' | 'bias')."""
  *modules, leaf = path
  parts = []
  for name in modules:
    indexed = re.fullmatch(r"(blocks|resblocks|cond_blocks|out_blocks)_(\d+)", name)
    if name == "cond_in":
      parts += ["cond_resnet", "blocks", "0"]
    elif name == "logits":
      parts += ["out", str(num_output_layers + 1)]
    elif indexed and indexed[1] == "cond_blocks":
      parts += ["cond_resnet", "blocks", str(int(indexed[2]) + 1)]
    elif indexed and indexed[1] == "out_blocks":
      parts += ["out", indexed[2]]
    elif indexed:
      parts += [indexed[1], indexed[2]]
    else:
      parts.append(name)
  causal = modules[0] in ("horizontal", "vertical") or (
      len(modules) == 3 and modules[1].startswith("resblocks_") and modules[2] != "condition")
  if modules[-2:-1] != ["causal_attention"]:  # convs: WNConv2d (in CausalConv2d) wrapping
    parts += ["conv", "conv"] if causal else ["conv"]
  return ".".join(parts + [{"v": "weight_v", "g": "weight_g", "bias": "bias"}[leaf]])


def pixelsnail_mapping(param_shapes: dict[tuple, Any], num_output_layers: int
                       ) -> dict[tuple, tuple[str, Transform]]:
  """Flax path ('params', ...) -> (torch key, transform) for every prior parameter."""
  def transform(leaf: str, ndim: int) -> Transform:
    if leaf == "v":
      return _conv if ndim == 4 else (lambda w: w.T)
    return (lambda w: w.reshape(-1)) if leaf == "g" else _same
  return {path: (_pixelsnail_key(path[1:], num_output_layers),
                 transform(path[-1], len(shape.shape)))
          for path, shape in param_shapes.items()}


# ----------------------------------------------------------------------------- both


def convert_variables(sd: dict, mapping: dict, shapes: dict, source: str,
                      ignored: tuple[str, ...] = ()) -> dict:
  """Flax variables from `sd` by `mapping`, checked against the model's `shapes`
  (flattened paths -> ShapeDtypeStruct): every key used, every shape equal."""
  missing = sorted({k for k, _ in mapping.values()} - set(sd))
  unexpected = sorted(set(sd) - {k for k, _ in mapping.values()} - set(ignored))
  out, bad = {}, []
  for path, (key, tf) in mapping.items():
    if key in sd:
      value = np.ascontiguousarray(tf(sd[key]), np.float32)
      if value.shape != tuple(shapes[path].shape):
        bad.append(f"{key} {sd[key].shape}")
      out[path] = value
  if missing or unexpected or bad or set(mapping) != set(shapes):
    few = lambda xs: ", ".join(xs[:6]) + (f" (+{len(xs) - 6})" if len(xs) > 6 else "")
    raise TorchImportError(
        f"{source} does not match the public architecture it was read as: missing "
        f"[{few(missing)}] unexpected [{few(unexpected)}] wrong shapes [{few(bad)}]")
  return flax.traverse_util.unflatten_dict(out)


def _flat_shapes(init_fn) -> dict[tuple, Any]:
  return flax.traverse_util.flatten_dict(
      flax.linen.unbox(jax.eval_shape(init_fn, jax.random.PRNGKey(0))))


def _save(w: workdir_lib.Workdir, stage: str, variables: dict, train_config,
          source: str) -> None:
  """Step 0 of `stage`: a whole train state (fresh optimizer) holding the variables."""
  params = jax.tree.map(jnp.asarray, variables["params"])
  tx = state_lib.make_optimizer(train_config)
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      model_state=jax.tree.map(jnp.asarray, {k: v for k, v in variables.items()
                                             if k != "params"}),
      ema_params=params if train_config.param_ema_decay > 0 else {},
      rng=jax.random.PRNGKey(0))
  checkpointer = ckpt_lib.Checkpointer(w.checkpoint_dir(stage), keep=None)
  try:
    checkpointer.save(0, state, {"step": 0, "data": {"epoch": 0, "step": 0}, "pending": [],
                                 "imported_from": os.path.basename(source),
                                 "source_sha256": convert.sha256_of(source)})
  finally:
    checkpointer.close()


def import_checkpoints(workdir: str, vqvae: str, priors: dict[str, str] | None = None,
                       image_size: int = 256) -> ml_collections.ConfigDict:
  """Writes `workdir` from the public VQ-VAE file and optional PixelSNAIL files.

  Args:
    workdir: a new (or empty) workdir.
    vqvae: the VQVAE state dict (e.g. vqvae_560.pt).
    priors: {'top': path, 'bottom': path}, either or both.
    image_size: the images' side the workdir records (the public FFHQ model: 256); the
      priors' code maps must have the shapes it gives.

  Returns:
    The recorded config.
  """
  priors = dict(priors or {})
  w = workdir_lib.Workdir(workdir)
  if w.has_checkpoint(registry.VQVAE) or w.has_manifest():
    raise TorchImportError(f"{workdir} already holds a stage-1 model or codes: import into a "
                       "new --workdir")
  sd, _ = read_checkpoint(vqvae, "the public VQ-VAE-2 code's VQVAE state dict")
  config = config_lib.base_config()
  config.experiment, config.stage = "imported", registry.VQVAE
  config.data.image_size = image_size
  config.vqvae.update(dict(vqvae_fields(sd, repr(vqvae)), num_levels=2, bottom_down=2,
                           upsample=registry.UPSAMPLE_TRANSPOSE,
                           architecture=registry.PUBLIC))
  config.vqvae_train.param_ema_decay = 0.0
  unknown = set(priors) - set(PUBLIC_LEVELS)
  if unknown:
    raise TorchImportError(f"priors for levels {sorted(unknown)}: the public model has "
                           f"{PUBLIC_LEVELS}")
  prior_files = {}
  for level, path in priors.items():
    psd, args = read_checkpoint(path, f"a train_pixelsnail.py checkpoint of the {level} prior")
    if args.get("hier", level) != level:
      raise TorchImportError(f"{path!r} was trained as the {args['hier']!r} prior, given as "
                         f"--prior-{level}")
    info = pixelsnail_fields(psd, args, repr(path))
    config.priors[level] = config_lib.prior_config(**info["fields"])
    prior_files[level] = (path, psd, info)
  config_lib.validate(config)
  model = builders.build_vqvae(config)
  shapes = _flat_shapes(builders.vqvae_init_fn(model, image_size))
  variables = convert_variables(sd, vqvae_mapping(config.vqvae.num_res_layers,
                                                  config.vqvae.code_dim), shapes, repr(vqvae))
  manifest = dict(vqvae_step=0, levels=list(PUBLIC_LEVELS),
                  shapes={k: list(v) for k, v in builders.code_shapes(config).items()},
                  num_codes=config.vqvae.num_codes,
                  dtype=codes_lib.code_dtype(config.vqvae.num_codes).name, splits={},
                  num_classes=0, class_names=[], image_size=image_size)
  converted = {}
  for level, (path, psd, info) in prior_files.items():
    want = tuple(manifest["shapes"][level])
    if info["shape"] != want or info["num_codes"] != config.vqvae.num_codes:
      raise TorchImportError(
          f"{path!r} models {info['shape']} maps of {info['num_codes']} codes; the VQ-VAE "
          f"at --image-size={image_size} gives {level} maps {want} of "
          f"{config.vqvae.num_codes} codes (set --image-size to the training size)")
    prior = builders.build_prior(config, level, manifest)
    pshapes = _flat_shapes(builders.prior_init_fn(prior, manifest, level))
    converted[level] = convert_variables(
        psd, pixelsnail_mapping(pshapes, config.priors[level].num_output_layers), pshapes,
        repr(path), ignored=("background",))
  # Everything checked: write the records, the checkpoints, then the manifest.
  w.write_config(registry.VQVAE, config)
  _save(w, registry.VQVAE, variables, config.vqvae_train, vqvae)
  for level, variables in converted.items():
    stage = registry.prior_stage(level)
    config.stage = stage
    w.write_config(stage, config)
    _save(w, stage, variables, config.priors[level].train, prior_files[level][0])
  storage.makedirs(w.extract_dir)  # the workdir may be a bucket URL
  storage.write_text(storage.join(w.extract_dir, codes_lib.MANIFEST),
                     json.dumps(manifest, indent=2))
  return config


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m vqvae2_jax.import_torch",
      description="Import the public PyTorch VQ-VAE-2 checkpoints into a workdir.")
  parser.add_argument("--vqvae", required=True, help="the VQVAE state dict (vqvae_560.pt)")
  parser.add_argument("--prior-top", help="train_pixelsnail.py checkpoint, --hier=top")
  parser.add_argument("--prior-bottom", help="train_pixelsnail.py checkpoint, --hier=bottom")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--image-size", type=int, default=256,
                      help="image side the models were trained at (default 256, FFHQ)")
  args = parser.parse_args(argv)
  priors = {k: v for k, v in zip(PUBLIC_LEVELS, (args.prior_top, args.prior_bottom)) if v}
  try:
    config = import_checkpoints(args.workdir, args.vqvae, priors, args.image_size)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(f"wrote {args.workdir}: vqvae ({config.vqvae.hidden} hidden, "
        f"{config.vqvae.num_codes} codes of {config.vqvae.code_dim})"
        + "".join(f", {registry.prior_stage(level)}" for level in priors))
  return 0


if __name__ == "__main__":
  sys.exit(main())
