"""Reads PyTorch `.pth` state dicts as NumPy arrays, without torch.

Two layouts written by `torch.save`:

- zip (torch >= 1.6, the default): `<name>/data.pkl` holds the object; each
  storage is the raw little-endian bytes of `<name>/data/<key>`.
- legacy (`_use_new_zipfile_serialization=False`, and files from before 1.6,
  e.g. EfficientNet-Lite0's weights): one stream of pickles: magic number,
  protocol version (1001), system info, the object, then the list of storage
  keys, then per key an int64 element count and the storage's raw bytes.

In both the object pickle refers to storages by persistent id
('storage', <torch.XStorage>, key, location, numel[, view]) and rebuilds
tensors with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)`. The unpickler below resolves exactly those globals (plus
`collections.OrderedDict`, the state-dict container) to NumPy stand-ins and
refuses every other global, so a file cannot run code while it is read (the
same promise as `torch.load(weights_only=True)`, with fewer types allowed).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> element dtype (little-endian, as torch writes them).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}


class UnsafePickleError(pickle.UnpicklingError):
  """The file's pickle names a global that is not a tensor or a state dict."""


class _StorageType:
  """Stand-in for torch.<Name>Storage: only its element dtype matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
  """One storage: a flat array, filled at once (zip) or after the object (legacy)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, int(numel)
    self.array: np.ndarray | None = None
    self.view_of: tuple[_Storage, int] | None = None  # legacy views: (root, offset)


class _TensorRef:
  """A tensor waiting for its storage's bytes: (storage, offset, size, stride)."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(size), tuple(stride)

  def to_numpy(self) -> np.ndarray:
    flat = self.storage.array
    if flat is None:
      raise pickle.UnpicklingError("a tensor's storage was never written to the file")
    itemsize = flat.dtype.itemsize
    extent = sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype)
    if self.offset + extent > flat.size:
      raise pickle.UnpicklingError(
          f"tensor of size {self.size} / stride {self.stride} at offset {self.offset} "
          f"overruns its storage of {flat.size} elements")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride])
    return np.array(view)  # an own, contiguous, writeable copy


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd state: meaningless here
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}
_ALLOWED.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})


class _Unpickler(pickle.Unpickler):
  """Resolves only tensor / storage / OrderedDict globals; storages via `storages`."""

  def __init__(self, file: BinaryIO, source: str, storages: dict[str, _Storage],
               read_storage=None):
    super().__init__(file)
    self._source, self._storages, self._read_storage = source, storages, read_storage

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"{self._source} refers to the Python global {module}.{name}; only tensors "
          "and (Ordered)dicts of them are read without torch. If you trust the file, "
          "load it with torch and save its state_dict() again.") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    view = pid[5] if len(pid) > 5 else None
    if key not in self._storages:
      storage = _Storage(storage_type.dtype, numel)
      if self._read_storage is not None:
        storage.array = self._read_storage(key, storage_type.dtype, numel)
      self._storages[key] = storage
    root = self._storages[key]
    if view is None:
      return root
    # Legacy storage views (torch < 0.4): (view_key, offset, size) of the root.
    view_key, offset, size = view
    if view_key not in self._storages:
      sub = _Storage(root.dtype, size)
      sub.view_of = (root, int(offset))  # resolved once the root's bytes are read
      self._storages[view_key] = sub
    return self._storages[view_key]


def _resolve(obj: Any) -> Any:
  """Replaces every _TensorRef in dicts / lists / tuples by its NumPy array."""
  if isinstance(obj, _TensorRef):
    return obj.to_numpy()
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path!r} is a zip file but not a torch.save archive "
                       f"(it has {len(pickles)} data.pkl entries)")
    prefix = pickles[0][:-len("data.pkl")]
    order = prefix + "byteorder"
    if order in names and archive.read(order).strip() != b"little":
      raise ValueError(f"{path!r} was saved on a big-endian machine; read it with torch")

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      raw = archive.read(f"{prefix}data/{key}")
      if len(raw) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"{path!r}: storage {key} is truncated")
      return np.frombuffer(raw, dtype, count=numel)

    storages: dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), repr(path), storages,
                     read_storage).load()
  return _resolve(obj)


class _Header(pickle.Unpickler):
  """The legacy header pickles hold only ints and a dict: no global at all."""

  def find_class(self, module, name):
    raise UnsafePickleError(f"legacy torch header refers to {module}.{name}")


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    try:
      magic = _Header(f).load()
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path!r} is not a PyTorch file ({type(e).__name__}: {e})") from e
    if magic != LEGACY_MAGIC:
      raise ValueError(f"{path!r} is not a PyTorch file (no torch.save magic number)")
    protocol = _Header(f).load()
    if protocol != LEGACY_PROTOCOL:
      raise ValueError(f"{path!r}: legacy torch protocol {protocol!r} is not supported")
    sys_info = _Header(f).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise ValueError(f"{path!r} was saved on a big-endian machine; read it with torch")
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(f, repr(path), storages).load()
    keys = _Header(f).load()
    for key in keys:
      storage = storages.get(str(key))
      header = f.read(8)
      if storage is None or len(header) < 8:
        raise pickle.UnpicklingError(f"{path!r}: storage {key} is missing or truncated")
      (numel,) = struct.unpack("<q", header)
      raw = f.read(numel * storage.dtype.itemsize)
      if len(raw) < numel * storage.dtype.itemsize:
        raise pickle.UnpicklingError(f"{path!r}: storage {key} is truncated")
      storage.array = np.frombuffer(raw, storage.dtype)
  for storage in storages.values():
    if storage.view_of is not None:
      root, offset = storage.view_of
      storage.array = root.array[offset:offset + storage.numel]
  return _resolve(obj)


def load(path: str) -> Any:
  """The object `torch.save` wrote to `path`, tensors as NumPy arrays.

  Args:
    path: a .pth / .pt file in the zip or the legacy layout.

  Returns:
    The saved (Ordered)dict / list / tuple structure; every tensor becomes an
    np.ndarray of its dtype and shape (bfloat16 as ml_dtypes.bfloat16).

  Raises:
    UnsafePickleError: the pickle names any global besides tensors, storages and
      OrderedDict (nothing in the file is executed).
    ValueError / pickle.UnpicklingError: not a torch file, or a damaged one.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} does not exist")
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)
