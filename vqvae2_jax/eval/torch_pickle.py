"""Reads PyTorch `.pth` files as NumPy arrays, without torch and without running the file.

Two layouts written by `torch.save`:

- zip (torch >= 1.6, the default): `<name>/data.pkl` holds the object; each
  storage is the raw little-endian bytes of the stored (uncompressed) record
  `<name>/data/<key>`.
- legacy (`_use_new_zipfile_serialization=False`, and files from before 1.6,
  e.g. EfficientNet-Lite0's weights): one stream of pickles: magic number,
  protocol version (1001), system info, the object, then the list of storage
  keys, then per key an int64 element count and the storage's raw bytes.

In both the object pickle refers to storages by persistent id
('storage', <torch.XStorage>, key, location, numel[, view]) and rebuilds tensors
with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

The object pickle is interpreted by `torch_pickle_machine` (no unpickler, no real class,
only OrderedDicts, checked tensor views and argparse.Namespace as a plain dict of plain
values; each load builds its own objects, so nothing a file does survives it). Storages
are then read and every tensor copied out of its checked view; memory stays bounded
(MAX_EXPANSION). Every problem raises `TorchFileError` (a ValueError) with a one-line
message.
"""
from __future__ import annotations

import collections
import io
import math
import os
import struct
import zipfile
from typing import Any

import numpy as np

from vqvae2_jax.eval.torch_pickle_machine import (MAX_DEPTH, STORAGE_DTYPES, Global,
                                                  Namespace, Storage, TensorRef,
                                                  TorchFileError, UnsafePickleError,
                                                  run_pickle)

__all__ = ["load", "loads", "TorchFileError", "UnsafePickleError", "STORAGE_DTYPES",
           "LEGACY_MAGIC", "LEGACY_PROTOCOL"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# Tensors are copied out of their storages; stride-0 views could ask for far more memory
# than the file holds. Their elements may total at most this many times the file's bytes.
MAX_EXPANSION = 16


class _Budget:
  """Bytes the copied tensors may still take (stride-0 views are no memory bombs)."""

  def __init__(self, file_bytes: int):
    self.left = MAX_EXPANSION * file_bytes + (1 << 20)

  def take(self, nbytes: int, source: str) -> None:
    self.left -= nbytes
    if self.left < 0:
      raise TorchFileError(f"{source}: its tensors would take more than {MAX_EXPANSION}x "
                           "the file's size in memory (stride-0 views); refused")


def _to_numpy(ref: TensorRef, budget: _Budget, source: str) -> np.ndarray:
  flat = ref.storage.array
  if flat is None:
    raise TorchFileError(f"{source}: storage {ref.storage.key} is never written to the file")
  count = math.prod(ref.size)
  budget.take(count * flat.dtype.itemsize, source)
  if not count:
    return np.zeros(ref.size, flat.dtype)
  # _rebuild_tensor checked offset + sum((n_k - 1) * s_k) < numel; flat holds numel.
  if flat.size != ref.storage.numel:
    raise TorchFileError(f"{source}: storage {ref.storage.key} has the wrong size")
  view = np.lib.stride_tricks.as_strided(
      flat[ref.offset:], shape=ref.size,
      strides=[s * flat.dtype.itemsize for s in ref.stride], writeable=False)
  return np.array(view)  # an own, contiguous, writeable copy


def _resolve(obj: Any, budget: _Budget, source: str, path: tuple[int, ...] = ()) -> Any:
  """Tensors -> arrays, Namespaces -> dicts; refuses cycles and deep nesting."""
  if isinstance(obj, TensorRef):
    return _to_numpy(obj, budget, source)
  if isinstance(obj, Namespace):
    return dict(obj.state or {})
  if isinstance(obj, (Global, Storage)):
    raise TorchFileError(f"{source}: the object holds a bare {type(obj).__name__.lower()}")
  if not isinstance(obj, (dict, list, tuple)):
    return obj
  if id(obj) in path or len(path) > MAX_DEPTH:
    raise TorchFileError(f"{source}: the object contains itself or is nested too deeply")
  path = path + (id(obj),)
  if isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v, budget, source, path)
    return out
  return type(obj)(_resolve(v, budget, source, path) for v in obj)


def _storage_bytes(raw: bytes | memoryview, storage: Storage, source: str) -> np.ndarray:
  if len(raw) != storage.numel * storage.dtype.itemsize:
    raise TorchFileError(f"{source}: storage {storage.key} holds {len(raw)} bytes, not "
                         f"{storage.numel} elements of {storage.dtype.itemsize} bytes")
  return np.frombuffer(raw, storage.dtype)


def _load_zip(data: bytes, source: str) -> Any:
  archive = zipfile.ZipFile(io.BytesIO(data))
  infos = {i.filename: i for i in archive.infolist()}
  pickles = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
  if len(pickles) != 1:
    raise TorchFileError(f"{source} is a zip file but not a torch.save archive "
                         f"(it has {len(pickles)} data.pkl entries)")
  if any(i.compress_type != zipfile.ZIP_STORED or i.file_size > len(data)
         for i in infos.values()):
    raise TorchFileError(f"{source}: a record is compressed or larger than the file; "
                         "torch.save stores records uncompressed")
  prefix = pickles[0][:-len("data.pkl")]
  if prefix + "byteorder" in infos and archive.read(prefix + "byteorder").strip() != b"little":
    raise TorchFileError(f"{source} was saved on a big-endian machine; read it with torch")
  storages: dict[str, Storage] = {}
  obj, _ = run_pickle(memoryview(archive.read(pickles[0])), 0, source, storages)
  for storage in storages.values():
    name = f"{prefix}data/{storage.key}"
    if storage.view_of is None:
      if name not in infos:
        raise TorchFileError(f"{source}: storage record {name} is missing")
      storage.array = _storage_bytes(archive.read(name), storage, source)
  _resolve_views(storages)
  return _resolve(obj, _Budget(len(data)), source)


def _resolve_views(storages: dict[str, Storage]) -> None:
  for storage in storages.values():
    if storage.view_of is not None:
      root, offset = storage.view_of
      if root.array is not None:
        storage.array = root.array[offset:offset + storage.numel]


def _load_legacy(data: bytes, source: str) -> Any:
  view, pos = memoryview(data), 0
  try:
    magic, pos = run_pickle(view, pos, source, None)
  except TorchFileError as e:
    raise TorchFileError(f"{source} is not a PyTorch file ({e})") from None
  if magic != LEGACY_MAGIC:
    raise TorchFileError(f"{source} is not a PyTorch file (no torch.save magic number)")
  protocol, pos = run_pickle(view, pos, source, None)
  if protocol != LEGACY_PROTOCOL:
    raise TorchFileError(f"{source}: legacy torch protocol {protocol!r:.50} is not supported")
  sys_info, pos = run_pickle(view, pos, source, None)
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise TorchFileError(f"{source} was saved on a big-endian machine; read it with torch")
  storages: dict[str, Storage] = {}
  obj, pos = run_pickle(view, pos, source, storages, pid_length=6)
  keys, pos = run_pickle(view, pos, source, None)
  if not isinstance(keys, list) or len(set(map(str, keys))) != len(keys):
    raise TorchFileError(f"{source}: the storage key list is malformed")
  for key in keys:
    storage = storages.get(key) if isinstance(key, str) else None
    if storage is None or storage.view_of is not None:
      raise TorchFileError(f"{source}: storage {key!r:.50} is listed but never used")
    if pos + 8 > len(data):
      raise TorchFileError(f"{source}: storage {key} is truncated")
    (numel,) = struct.unpack_from("<q", data, pos)
    nbytes = numel * storage.dtype.itemsize
    if numel != storage.numel or pos + 8 + nbytes > len(data):
      raise TorchFileError(f"{source}: storage {key} is truncated or of the wrong size")
    storage.array = _storage_bytes(view[pos + 8:pos + 8 + nbytes], storage, source)
    pos += 8 + nbytes
  _resolve_views(storages)
  return _resolve(obj, _Budget(len(data)), source)


def loads(data: bytes, source: str = "the given bytes") -> Any:
  """The object of a torch.save file held in memory (see `load`)."""
  data = bytes(data)
  try:
    if data[:4] == b"PK\x03\x04" or zipfile.is_zipfile(io.BytesIO(data)):
      return _load_zip(data, source)
    return _load_legacy(data, source)
  except TorchFileError:
    raise
  except Exception as e:  # zipfile, struct, numpy, recursion, memory errors
    raise TorchFileError(f"{source} is not a readable torch.save file "
                         f"({type(e).__name__}: {e})") from None


def load(path: str) -> Any:
  """The object `torch.save` wrote to `path`, tensors as NumPy arrays.

  Args:
    path: a .pth / .pt file in the zip or the legacy layout.

  Returns:
    The saved (Ordered)dict / list / tuple structure of plain values; every tensor
    becomes an np.ndarray of its dtype and shape (bfloat16 as ml_dtypes.bfloat16), an
    argparse.Namespace a dict of its plain attributes.

  Raises:
    FileNotFoundError: no such file.
    UnsafePickleError: the pickle names any other global or operation (nothing in the
      file is executed).
    TorchFileError: not a torch file, or a damaged or malformed one.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} does not exist")
  with open(path, "rb") as f:
    return loads(f.read(), repr(path))
