"""The pickle machine of `torch_pickle`: interprets a torch.save object pickle safely.

Never calls Python's unpickler and never touches a real class. Only the opcodes of
protocol-2 containers and scalars are known; globals become inert tokens (`Global`);
the only calls a file may ask for are `OrderedDict()`, torch's two tensor rebuild
functions (arguments checked: non-negative offset, sizes and strides, the whole view
inside its storage, computed on Python integers so nothing overflows) and
`argparse.Namespace()`, whose BUILD state becomes a plain dict of plain values. BUILD is
otherwise accepted only on an OrderedDict (its `_metadata`, dropped); every other opcode
that could construct an object or reach its state (INST, OBJ, NEWOBJ_EX, EXT*, any other
REDUCE / NEWOBJ / BUILD) is refused. Every object is created by this load, so nothing a
file does survives it. Problems raise `TorchFileError` with a one-line message.
"""
from __future__ import annotations

import collections
import math
import struct
from typing import Any

import ml_dtypes
import numpy as np

MAX_DIMS = 64          # torch's own limit on tensor dimensions
MAX_DEPTH = 64         # nesting of containers in the loaded object
MAX_INT_BYTES = 16     # LONG1 / LONG4 beyond 128 bits are no size, offset or count

# torch.<Name>Storage -> element dtype (little-endian, as torch writes them).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
_REBUILD_PARAMETER = ("torch._utils", "_rebuild_parameter")
_ORDERED_DICT = ("collections", "OrderedDict")
_NAMESPACE = ("argparse", "Namespace")
_KNOWN_GLOBALS = {_REBUILD_TENSOR, _REBUILD_PARAMETER, _ORDERED_DICT, _NAMESPACE} | {
    ("torch", name) for name in STORAGE_DTYPES}


class TorchFileError(ValueError):
  """The file is not a readable torch.save file of tensors (one-line message)."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split())[:500])


class UnsafePickleError(TorchFileError):
  """The file's pickle names a global or asks for an operation that is not allowed."""


class Global:
  """An inert token for a global the pickle named; resolved by (module, name) only."""
  __slots__ = ("key",)

  def __init__(self, module: str, name: str):
    self.key = (module, name)


class Storage:
  """One storage of this load: dtype, element count, and its bytes once read."""
  __slots__ = ("key", "dtype", "numel", "array", "view_of")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.array: np.ndarray | None = None
    self.view_of: tuple[Storage, int] | None = None  # legacy views: (root, offset)


class TensorRef:
  """A checked tensor view waiting for its storage's bytes."""
  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class Namespace:
  """argparse.Namespace of this load; BUILD fills `state`, loading returns it as a dict."""
  __slots__ = ("state",)

  def __init__(self):
    self.state: dict | None = None


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_plain(value: Any, what: str, depth: int = 0) -> Any:
  """`value` if it is None / bool / int / float / str / bytes or a list / tuple of them."""
  if depth > MAX_DEPTH:
    raise TorchFileError(f"{what} is nested too deeply")
  if value is None or isinstance(value, (bool, int, float, str, bytes)):
    return value
  if isinstance(value, (list, tuple)):
    return type(value)(_check_plain(v, what, depth + 1) for v in value)
  raise UnsafePickleError(f"{what} holds a {type(value).__name__}; only plain values "
                          "(numbers, strings, None, lists of them) are read")


def _rebuild_tensor(args: tuple) -> TensorRef:
  """Checks _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks
  [, metadata]) and returns the view. Python integers: nothing overflows."""
  if not 6 <= len(args) <= 7:
    raise TorchFileError(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
  storage, offset, size, stride, requires_grad, hooks = args[:6]
  metadata = args[6] if len(args) == 7 else None
  if not isinstance(storage, Storage):
    raise TorchFileError("_rebuild_tensor_v2's first argument is not a storage")
  if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
          and len(size) <= MAX_DIMS and all(map(_is_int, size + stride))):
    raise TorchFileError(f"a tensor's size {size!r} / stride {stride!r} are not two "
                         f"integer tuples of one length (at most {MAX_DIMS})")
  if not _is_int(offset) or offset < 0 or any(n < 0 for n in size) or any(
      s < 0 for s in stride):
    raise TorchFileError(f"a tensor has a negative offset, size or stride (offset "
                         f"{offset!r}, size {size}, stride {stride})")
  if not isinstance(requires_grad, bool):
    raise TorchFileError("_rebuild_tensor_v2's requires_grad is not a bool")
  if not (isinstance(hooks, collections.OrderedDict) and not hooks):
    raise UnsafePickleError("a tensor carries backward hooks; only plain tensors are read")
  if metadata not in (None, {}) and not (isinstance(metadata, dict) and not metadata):
    raise UnsafePickleError("a tensor carries Python metadata; only plain tensors are read")
  if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 > (
      storage.numel):
    raise TorchFileError(f"a tensor of size {size} / stride {stride} at offset {offset} "
                         f"overruns its storage of {storage.numel} elements")
  if not math.prod(size) and offset > storage.numel:
    raise TorchFileError(f"an empty tensor's offset {offset} lies beyond its storage of "
                         f"{storage.numel} elements")
  return TensorRef(storage, offset, size, stride)


class _Machine:
  """Interprets one pickle from `data[pos:]`: a restricted protocol-0..4 subset."""

  def __init__(self, data: memoryview, pos: int, source: str, storages: dict | None,
               pid_length: int):
    self.data, self.pos, self.source = data, pos, source
    self.storages = storages  # None: no persistent ids allowed (legacy header pickles)
    self.pid_length = pid_length  # zip: 5 fields; legacy: 6 (the last a view or None)
    self.stack: list[Any] = []
    self.marks: list[int] = []
    self.memo: dict[int, Any] = {}

  # ------------------------------------------------------------ reading
  def read(self, n: int) -> memoryview:
    if n < 0 or self.pos + n > len(self.data):
      raise TorchFileError(f"{self.source} ends inside a pickle (wanted {n} bytes at "
                           f"{self.pos}, the file has {len(self.data)})")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def unpack(self, fmt: str) -> Any:
    return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

  def line(self) -> str:
    end = bytes(self.data[self.pos:self.pos + 256]).find(b"\n")
    if end < 0:
      raise TorchFileError(f"{self.source}: a GLOBAL name is unterminated or too long")
    text = bytes(self.read(end + 1)[:-1])
    try:
      return text.decode("ascii")
    except UnicodeDecodeError:
      raise TorchFileError(f"{self.source}: a GLOBAL name is not ASCII") from None

  def text(self, n: int) -> str:
    try:
      return bytes(self.read(n)).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
      raise TorchFileError(f"{self.source}: a string is not UTF-8") from None

  def pop_mark(self) -> list:
    """The items pushed since the last MARK (which is dropped)."""
    if not self.marks:
      raise TorchFileError(f"{self.source}: pickle pops a MARK it never set")
    at = self.marks.pop()
    items, self.stack[at:] = self.stack[at:], []
    return items

  def pop(self) -> Any:
    self.top()
    return self.stack.pop()

  def top(self) -> Any:
    """The top of the stack, never reaching below the innermost MARK."""
    if len(self.stack) <= (self.marks[-1] if self.marks else 0):
      raise TorchFileError(f"{self.source}: pickle stack underflow")
    return self.stack[-1]

  # ------------------------------------------------------------ objects
  def find_global(self, module: str, name: str) -> Global:
    if (module, name) not in _KNOWN_GLOBALS:
      raise UnsafePickleError(
          f"{self.source} refers to the Python global {module}.{name}; only tensors, "
          "(Ordered)dicts and argparse.Namespace of plain values are read without torch. If "
          "you trust the file, load it with torch and save its state_dict() again.")
    return Global(module, name)

  def reduce(self, func: Any, args: Any) -> Any:
    if not isinstance(func, Global) or not isinstance(args, tuple):
      raise UnsafePickleError(f"{self.source}: REDUCE on a {type(func).__name__}")
    if func.key == _ORDERED_DICT and args == ():
      return collections.OrderedDict()
    if func.key == _REBUILD_TENSOR:
      return _rebuild_tensor(args)
    if func.key == _REBUILD_PARAMETER and len(args) == 3 and isinstance(args[0], TensorRef):
      if not (isinstance(args[2], collections.OrderedDict) and not args[2]):
        raise UnsafePickleError("a parameter carries backward hooks")
      return args[0]
    raise UnsafePickleError(f"{self.source}: calling {'.'.join(func.key)} with "
                            f"{len(args)} arguments is not allowed")

  def newobj(self, cls: Any, args: Any) -> Any:
    if isinstance(cls, Global) and cls.key == _NAMESPACE and args == ():
      return Namespace()
    what = ".".join(cls.key) if isinstance(cls, Global) else type(cls).__name__
    raise UnsafePickleError(f"{self.source}: NEWOBJ of {what} is not allowed")

  def build(self, obj: Any, state: Any) -> None:
    if isinstance(obj, Namespace) and obj.state is None and isinstance(state, dict) and all(
        isinstance(k, str) for k in state):
      obj.state = {k: _check_plain(v, f"{self.source}: args.{k}") for k, v in state.items()}
      return
    if isinstance(obj, collections.OrderedDict) and isinstance(state, dict) and set(
        state) <= {"_metadata"}:
      return  # a state dict's per-module version numbers: not needed, dropped
    raise UnsafePickleError(f"{self.source}: BUILD on a {type(obj).__name__} is not allowed")

  def persistent_load(self, pid: Any) -> Storage:
    if self.storages is None:
      raise UnsafePickleError(f"{self.source}: a header pickle refers to a storage")
    if not (isinstance(pid, tuple) and len(pid) == self.pid_length and pid[0] == "storage"
            and isinstance(pid[1], Global) and pid[1].key[0] == "torch"
            and pid[1].key[1] in STORAGE_DTYPES and isinstance(pid[2], str)
            and isinstance(pid[3], str) and _is_int(pid[4]) and pid[4] >= 0):
      raise TorchFileError(f"{self.source}: unsupported persistent id {pid!r:.200}")
    dtype, key, numel = STORAGE_DTYPES[pid[1].key[1]], pid[2], pid[4]
    view = pid[5] if self.pid_length == 6 else None
    root = self.storages.get(key)
    if root is None:
      root = self.storages[key] = Storage(key, dtype, numel)
    elif root.dtype != dtype or root.numel != numel:
      raise TorchFileError(f"{self.source}: storage {key} is referred to with two "
                           "different types or sizes")
    if view is None:
      return root
    # Legacy storage views (torch < 0.4): (view_key, offset, size) of the root.
    if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
            and _is_int(view[1]) and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0
            and view[1] + view[2] <= numel):
      raise TorchFileError(f"{self.source}: storage view {view!r:.200} is not inside "
                           f"storage {key} of {numel} elements")
    sub = self.storages.get(view[0])
    if sub is None:
      sub = self.storages[view[0]] = Storage(view[0], dtype, view[2])
      sub.view_of = (root, view[1])
    elif sub.view_of != (root, view[1]) or sub.numel != view[2]:
      raise TorchFileError(f"{self.source}: storage view {view[0]} is defined twice")
    return sub

  # ------------------------------------------------------------ the loop
  def run(self) -> Any:
    """Executes opcodes until STOP; returns the object."""
    dispatch = _DISPATCH
    while True:
      at = self.pos
      code = self.read(1)[0]
      handler = dispatch.get(code)
      if handler is None:
        raise UnsafePickleError(f"{self.source}: pickle opcode {bytes([code])!r} at byte "
                                f"{at} is not allowed")
      if handler(self) is _STOP:
        if len(self.stack) != 1 or self.marks:
          raise TorchFileError(f"{self.source}: malformed pickle (stack at STOP)")
        return self.stack.pop()


_STOP = object()


def _key(k: Any) -> Any:
  """A dict key: plain and hashable (no tensors or containers as keys)."""
  if k is None or isinstance(k, (bool, int, float, str, bytes)):
    return k
  if isinstance(k, tuple):
    return tuple(_key(x) for x in k)
  raise TorchFileError(f"a dict key is a {type(k).__name__}")


def _setitems(m: _Machine, obj: Any, items: list) -> None:
  if not isinstance(obj, dict) or len(items) % 2:
    raise TorchFileError(f"{m.source}: SETITEM(S) on a {type(obj).__name__}")
  for i in range(0, len(items), 2):
    obj[_key(items[i])] = items[i + 1]


def _appends(m: _Machine, obj: Any, items: list) -> None:
  if not isinstance(obj, list):
    raise TorchFileError(f"{m.source}: APPEND(S) on a {type(obj).__name__}")
  obj.extend(items)


def _memo_put(m: _Machine, index: int) -> None:
  m.memo[index] = m.top()


def _memo_get(m: _Machine, index: int) -> None:
  if index not in m.memo:
    raise TorchFileError(f"{m.source}: pickle reads memo entry {index} it never wrote")
  m.stack.append(m.memo[index])


def _long(m: _Machine, n: int) -> None:
  if n > MAX_INT_BYTES:
    raise TorchFileError(f"{m.source}: a {n}-byte integer is no size, offset or count")
  m.stack.append(int.from_bytes(m.read(n), "little", signed=True))


def _tuple_n(m: _Machine, n: int) -> None:
  items = [m.pop() for _ in range(n)][::-1]
  m.stack.append(tuple(items))


def _proto(m: _Machine) -> None:
  if m.read(1)[0] > 5:
    raise TorchFileError(f"{m.source}: unknown pickle protocol")


def _newobj(m: _Machine) -> None:
  args = m.pop()
  m.stack.append(m.newobj(m.pop(), args))


def _reduce(m: _Machine) -> None:
  args = m.pop()
  m.stack.append(m.reduce(m.pop(), args))


def _build(m: _Machine) -> None:
  state = m.pop()
  m.build(m.top(), state)


def _dict_from_mark(m: _Machine) -> None:
  d: dict = {}
  _setitems(m, d, m.pop_mark())
  m.stack.append(d)


def _setitem(m: _Machine) -> None:
  value = m.pop()
  key = m.pop()
  _setitems(m, m.top(), [key, value])


def _append(m: _Machine) -> None:
  value = m.pop()
  _appends(m, m.top(), [value])


def _setitems_op(m: _Machine) -> None:
  items = m.pop_mark()
  _setitems(m, m.top(), items)


def _appends_op(m: _Machine) -> None:
  items = m.pop_mark()
  _appends(m, m.top(), items)


def _stack_global(m: _Machine) -> None:
  name, module = m.pop(), m.pop()
  if not (isinstance(module, str) and isinstance(name, str)):
    raise TorchFileError(f"{m.source}: STACK_GLOBAL of non-strings")
  m.stack.append(m.find_global(module, name))


def _global(m: _Machine) -> None:
  module = m.line()
  m.stack.append(m.find_global(module, m.line()))


def _persid(m: _Machine) -> None:
  m.stack.append(m.persistent_load(m.pop()))


def _mark(m: _Machine) -> None:
  m.marks.append(len(m.stack))


def _pop(m: _Machine) -> None:
  m.pop()


_DISPATCH = {
    0x80: _proto,                                                  # PROTO
    0x95: lambda m: m.read(8) and None,                            # FRAME (length only)
    ord("."): lambda m: _STOP,                                     # STOP
    ord("("): _mark,                                               # MARK
    ord("0"): _pop,                                                # POP
    ord("}"): lambda m: m.stack.append({}),                        # EMPTY_DICT
    ord("]"): lambda m: m.stack.append([]),                        # EMPTY_LIST
    ord(")"): lambda m: m.stack.append(()),                        # EMPTY_TUPLE
    ord("t"): lambda m: m.stack.append(tuple(m.pop_mark())),       # TUPLE
    0x85: lambda m: _tuple_n(m, 1), 0x86: lambda m: _tuple_n(m, 2),
    0x87: lambda m: _tuple_n(m, 3),                                # TUPLE1..3
    ord("l"): lambda m: m.stack.append(list(m.pop_mark())),        # LIST
    ord("d"): _dict_from_mark,                                     # DICT
    ord("s"): _setitem, ord("u"): _setitems_op,                    # SETITEM(S)
    ord("a"): _append, ord("e"): _appends_op,                      # APPEND(S)
    ord("N"): lambda m: m.stack.append(None),                      # NONE
    0x88: lambda m: m.stack.append(True), 0x89: lambda m: m.stack.append(False),
    ord("J"): lambda m: m.stack.append(m.unpack("<i")),            # BININT
    ord("K"): lambda m: m.stack.append(m.unpack("<B")),            # BININT1
    ord("M"): lambda m: m.stack.append(m.unpack("<H")),            # BININT2
    0x8A: lambda m: _long(m, m.unpack("<B")),                      # LONG1
    0x8B: lambda m: _long(m, m.unpack("<i")),                      # LONG4
    ord("G"): lambda m: m.stack.append(m.unpack(">d")),            # BINFLOAT
    ord("X"): lambda m: m.stack.append(m.text(m.unpack("<I"))),    # BINUNICODE
    0x8C: lambda m: m.stack.append(m.text(m.unpack("<B"))),        # SHORT_BINUNICODE
    0x8D: lambda m: m.stack.append(m.text(m.unpack("<Q"))),        # BINUNICODE8
    ord("T"): lambda m: m.stack.append(m.text(m.unpack("<i"))),    # BINSTRING (py2)
    ord("U"): lambda m: m.stack.append(m.text(m.unpack("<B"))),    # SHORT_BINSTRING
    ord("B"): lambda m: m.stack.append(bytes(m.read(m.unpack("<I")))),   # BINBYTES
    ord("C"): lambda m: m.stack.append(bytes(m.read(m.unpack("<B")))),   # SHORT_BINBYTES
    ord("q"): lambda m: _memo_put(m, m.unpack("<B")),              # BINPUT
    ord("r"): lambda m: _memo_put(m, m.unpack("<I")),              # LONG_BINPUT
    0x94: lambda m: _memo_put(m, len(m.memo)),                     # MEMOIZE
    ord("h"): lambda m: _memo_get(m, m.unpack("<B")),              # BINGET
    ord("j"): lambda m: _memo_get(m, m.unpack("<I")),              # LONG_BINGET
    ord("c"): _global, 0x93: _stack_global,                        # GLOBAL, STACK_GLOBAL
    ord("Q"): _persid,                                             # BINPERSID
    ord("R"): _reduce, 0x81: _newobj, ord("b"): _build,            # REDUCE, NEWOBJ, BUILD
}


def run_pickle(data: memoryview, pos: int, source: str, storages: dict | None = None,
                pid_length: int = 5) -> tuple[Any, int]:
  """(object, position after its STOP) of the pickle at data[pos:]; `storages` collects
  the storages its persistent ids name (None: none allowed); pid_length 5 (zip) or 6."""
  machine = _Machine(data, pos, source, storages, pid_length)
  return machine.run(), machine.pos
