"""Crafted and mutated torch.save files for the reader's fuzz test (needs torch).

`cases(seed)` yields (name, bytes, must_refuse) for: bit flips and truncations of real
torch.save files in both layouts, bit flips inside a zip's pickle re-packed with valid
CRCs, tensors with crafted sizes / strides / offsets, and BUILD / REDUCE / NEWOBJ on every
global the reader knows. `check(load, name, data, base)` asserts one case's outcome.
Kept importable without pytest so one case can be run against any reader.
"""
from __future__ import annotations

import argparse
import collections
import io
import math
import pickle
import random
import struct
import zipfile
from typing import Any, Callable, Iterator

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGES = ("DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
            "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage")
ITEMSIZE = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
            "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
            "ByteStorage": 1, "BoolStorage": 1}
KNOWN_GLOBALS = ([("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                  ("torch._utils", "_rebuild_parameter"), ("argparse", "Namespace")]
                 + [("torch", s) for s in STORAGES])


class Pickle:
  """Writes protocol-2 pickle opcodes by hand (crafted files torch.save never writes)."""

  def __init__(self):
    self.b = bytearray(b"\x80\x02")

  def op(self, code: bytes) -> "Pickle":
    self.b += code
    return self

  def glob(self, module: str, name: str) -> "Pickle":
    return self.op(b"c" + f"{module}\n{name}\n".encode())

  def int(self, v: int) -> "Pickle":
    n = max(1, (v.bit_length() + 8) // 8)
    return self.op(b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True))

  def str(self, s: str) -> "Pickle":
    raw = s.encode()
    return self.op(b"X" + struct.pack("<I", len(raw)) + raw)

  def tuple_of(self, values) -> "Pickle":
    self.op(b"(")
    for v in values:
      self.int(v)
    return self.op(b"t")

  def empty_ordered_dict(self) -> "Pickle":
    return self.glob("collections", "OrderedDict").op(b")R")

  def tensor(self, key: str, storage: str, numel: int, offset: int, size, stride,
             legacy: bool = False) -> "Pickle":
    self.glob("torch._utils", "_rebuild_tensor_v2").op(b"(")
    self.op(b"(").str("storage").glob("torch", storage).str(key).str("cpu").int(numel)
    self.op(b"Nt" if legacy else b"t").op(b"Q").int(offset).tuple_of(size).tuple_of(stride).op(b"\x89")
    return self.empty_ordered_dict().op(b"tR")

  def bytes(self) -> bytes:
    return bytes(self.b + b".")


def zip_file(pkl: bytes, records: dict[str, bytes]) -> bytes:
  """A zip-layout torch.save file holding pickle `pkl` and storage records."""
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")
    for key, raw in records.items():
      z.writestr(f"archive/data/{key}", raw)
    z.writestr("archive/version", "3\n")
  return out.getvalue()


def legacy_file(pkl: bytes, records: dict[str, tuple[int, bytes]]) -> bytes:
  """A legacy-layout file: header pickles, `pkl`, the key list, then each storage."""
  head = b"".join(pickle.dumps(x, protocol=2) for x in (
      LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                           "type_sizes": {"short": 2, "int": 4, "long": 4}}))
  tail = pickle.dumps(list(records), protocol=2)
  for numel, raw in records.values():
    tail += struct.pack("<q", numel) + raw
  return head + pkl + tail


def one_tensor_files(storage: str, numel: int, offset: int, size, stride) -> list[bytes]:
  """{'t': tensor} over storage '0' declared of `numel` elements, in both layouts; the
  file holds 24 elements' bytes (a crafted numel may disagree with them)."""
  raw = (bytes(range(256)) * 1)[:24 * ITEMSIZE[storage]]
  pkl = lambda legacy: Pickle().empty_ordered_dict().op(b"(").str("t").tensor(
      "0", storage, numel, offset, size, stride, legacy).op(b"u").bytes()
  return [zip_file(pkl(False), {"0": raw}), legacy_file(pkl(True), {"0": (24, raw)})]


def wrapped(body: Callable[[Pickle], Any]) -> bytes:
  """{'x': <what body pushes>} as a zip file with one valid 4-element float storage."""
  p = Pickle().empty_ordered_dict().op(b"(").str("x")
  body(p)
  return zip_file(p.op(b"u").bytes(), {"0": np.arange(4, dtype="<f4").tobytes()})


def base_files(torch) -> dict[str, bytes]:
  """Real torch.save files: a state dict with views and every dtype, in both layouts,
  and a train_pixelsnail.py-style {'model': ..., 'args': Namespace} checkpoint."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(5, 6, generator=g)
  sd = collections.OrderedDict([
      ("w", torch.randn(3, 2, 3, generator=g)), ("t", base.t()), ("row", base[2]),
      ("half", torch.randn(4, generator=g).half()), ("bf", torch.randn(3, generator=g).bfloat16()),
      ("long", torch.arange(5)), ("mask", torch.tensor([True, False])),
      ("n", torch.tensor(7)), ("empty", torch.zeros(0, 3))])
  out = {}
  for name, obj, layout in (("zip", sd, True), ("legacy", sd, False),
                            ("args", {"model": sd, "args": argparse.Namespace(
                                channel=8, hier="top", sched=None, dropout=0.1)}, True)):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=layout)
    out[name] = buf.getvalue()
  return out


def _repack_pickle(data: bytes, mutate: Callable[[bytearray], None]) -> bytes:
  """The zip file with its data.pkl mutated and every CRC valid again."""
  src = zipfile.ZipFile(io.BytesIO(data))
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
    for info in src.infolist():
      raw = src.read(info.filename)
      if info.filename.endswith("data.pkl"):
        raw = bytearray(raw)
        mutate(raw)
        raw = bytes(raw)
      z.writestr(info.filename, raw)
  return out.getvalue()


def _flip(rng: random.Random, buf: bytearray, lo: int = 0) -> None:
  for _ in range(rng.choice((1, 1, 2, 3))):
    i = rng.randrange(lo, len(buf))
    buf[i] ^= 1 << rng.randrange(8)


SPECIAL_INTS = (0, 1, 2, 3, 23, 24, 25, -1, -2, 4000, -4000, 2**31 - 1, 2**31, 2**32,
                2**62, 2**63 - 1, 2**63, -2**63, 2**64)


def cases(torch, seed: int = 0, scale: int = 1) -> Iterator[tuple[str, bytes, bool, str]]:
  """(name, file bytes, must_refuse, base name or '') for every fuzz case."""
  rng = random.Random(seed)
  bases = base_files(torch)
  # The out-of-bounds read of the review: negative strides, and a negative offset.
  for f in one_tensor_files("FloatStorage", 24, 0, (2, 2), (4000, -4000)):
    yield "negative stride", f, True, ""
  for f in one_tensor_files("FloatStorage", 24, -8, (2,), (1,)):
    yield "negative offset", f, True, ""
  for f in one_tensor_files("FloatStorage", 24, 20, (2, 3), (3, 1)):
    yield "view past the end", f, True, ""
  # Crafted sizes / strides / offsets against a 24-element storage.
  pick = lambda: rng.choice(SPECIAL_INTS) if rng.random() < 0.4 else rng.randrange(-3, 30)
  for i in range(150 * scale):
    ndim = rng.randrange(0, 4)
    size = tuple(pick() if rng.random() < 0.5 else rng.randrange(0, 5) for _ in range(ndim))
    stride = tuple(pick() if rng.random() < 0.5 else rng.randrange(0, 7) for _ in range(ndim))
    offset = pick() if rng.random() < 0.3 else rng.randrange(0, 8)
    numel = rng.choice((24, 24, 0, 1, 2**40)) if rng.random() < 0.1 else 24
    storage = rng.choice(STORAGES)
    for f in one_tensor_files(storage, numel, offset, size, stride):
      yield f"crafted {storage} {numel} {offset} {size} {stride}", f, False, ""
  # BUILD / REDUCE / NEWOBJ on every known global, and on what they return.
  for module, name in KNOWN_GLOBALS:
    g = lambda p, m=module, n=name: p.glob(m, n)
    yield f"BUILD on {name}", wrapped(lambda p: g(p).op(b"}").str("dtype").str("x").op(
        b"sb")), True, ""
    yield f"REDUCE {name}(1)", wrapped(lambda p: g(p).op(b"(").int(1).op(b"tR")), True, ""
    yield f"REDUCE {name}('a', 'b')", wrapped(
        lambda p: g(p).op(b"(").str("a").str("b").op(b"tR")), True, ""
    yield f"NEWOBJ {name}(1)", wrapped(lambda p: g(p).op(b"(").int(1).op(b"t\x81")), True, ""
    if name not in ("OrderedDict", "Namespace"):
      yield f"REDUCE {name}()", wrapped(lambda p: g(p).op(b")R")), True, ""
      yield f"NEWOBJ {name}()", wrapped(lambda p: g(p).op(b")\x81")), True, ""
    yield f"bare {name}", wrapped(g), True, ""
  ns = lambda p: p.glob("argparse", "Namespace").op(b")\x81")
  tensor = lambda p: p.tensor("0", "FloatStorage", 4, 0, (4,), (1,))
  yield "BUILD OrderedDict state", wrapped(lambda p: p.empty_ordered_dict().op(b"}").str(
      "x").int(1).op(b"sb")), True, ""
  yield "BUILD on a tensor", wrapped(lambda p: tensor(p).op(b"}").str("x").int(1).op(
      b"sb")), True, ""
  yield "Namespace of a tensor", wrapped(lambda p: tensor(ns(p).op(b"}").str("a")).op(
      b"sb")), True, ""
  yield "Namespace of a global", wrapped(lambda p: ns(p).op(b"}").str("a").glob(
      "argparse", "Namespace").op(b"sb")), True, ""
  yield "Namespace built twice", wrapped(lambda p: ns(p).op(b"}b}b")), True, ""
  yield "tensor with hooks", wrapped(lambda p: p.glob(
      "torch._utils", "_rebuild_tensor_v2").op(b"((").str("storage").glob(
          "torch", "FloatStorage").str("0").str("cpu").int(4).op(b"tQ").int(0).tuple_of(
              (4,)).tuple_of((1,)).op(b"\x89").empty_ordered_dict().op(b"(").int(0).int(1).op(
                  b"utR")), True, ""
  yield "list containing itself", wrapped(lambda p: p.op(b"]q\x00h\x00a")), True, ""
  for code in (b"i", b"o", b"\x82", b"\x92", b"2", b"P", b"\x8f", b"\x91", b"\x96", b"1",
               b"I", b"S", b"V", b"g"):
    yield f"opcode {code!r}", wrapped(lambda p, c=code: p.op(b"N").op(c)), True, ""
  yield "os.system", wrapped(lambda p: p.glob("os", "system").op(b"(").str("true").op(
      b"tR")), True, ""
  yield "builtins.eval", wrapped(lambda p: p.str("builtins").str("eval").op(b"\x93")), True, ""
  # Bit flips and truncations of the real files; flips inside the zip's pickle too.
  for base_name, data in bases.items():
    for i in range(300 * scale):
      buf = bytearray(data)
      _flip(rng, buf)
      yield f"flip {base_name} #{i}", bytes(buf), False, base_name
    for i in range(80 * scale):
      yield f"cut {base_name} #{i}", data[:rng.randrange(len(data))], False, base_name
    if base_name != "legacy":
      for i in range(250 * scale):
        yield (f"pickle flip {base_name} #{i}",
               _repack_pickle(data, lambda b: _flip(rng, b)), False, base_name)


def same(ours: Any, theirs: Any, torch) -> bool:
  """Our object equals torch.load's: arrays bit for bit, Namespaces as dicts."""
  if isinstance(theirs, torch.Tensor):
    want = theirs.view(torch.int16) if theirs.dtype == torch.bfloat16 else theirs
    got = ours.view(np.int16) if str(ours.dtype) == "bfloat16" else ours
    want = want.numpy()
    return (isinstance(got, np.ndarray) and got.dtype == want.dtype
            and got.shape == want.shape and got.tobytes() == np.ascontiguousarray(want).tobytes())
  if isinstance(theirs, argparse.Namespace):
    theirs = vars(theirs)
  if isinstance(theirs, dict):
    return (isinstance(ours, dict) and list(ours) == list(theirs)
            and all(same(ours[k], v, torch) for k, v in theirs.items()))
  if isinstance(theirs, (list, tuple)):
    return (type(ours) is type(theirs) and len(ours) == len(theirs)
            and all(same(a, b, torch) for a, b in zip(ours, theirs)))
  if isinstance(theirs, float) and math.isnan(theirs):
    return isinstance(ours, float) and math.isnan(ours)
  return type(ours) is type(theirs) and ours == theirs


def torch_load(torch, data: bytes) -> Any:
  with torch.serialization.safe_globals([argparse.Namespace]):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def check(load: Callable[[bytes], Any], error: type, torch, name: str, data: bytes,
          must_refuse: bool, base: bytes | None) -> str:
  """Asserts one case: loaded equal to torch's result (or, where torch refuses a damaged
  file, equal to the undamaged file's), or refused with a one-line `error`. Returns
  'loaded' or 'refused'."""
  try:
    ours = load(data)
  except error as e:
    assert "\n" not in str(e) and str(e), f"{name}: not a one-line message: {e!r}"
    return "refused"
  assert not must_refuse, f"{name}: loaded, must be refused"
  try:
    theirs = torch_load(torch, data)
  except Exception:  # pylint: disable=broad-except
    # torch refuses (e.g. a flip in a record neither needs to read): ours must then be
    # exactly the undamaged file's object, never bytes from elsewhere.
    assert base is not None, f"{name}: loaded what torch refuses"
    theirs = torch_load(torch, base)
  assert same(ours, theirs, torch), f"{name}: loaded differently from torch"
  return "loaded"
