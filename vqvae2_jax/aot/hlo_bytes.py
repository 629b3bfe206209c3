"""HBM bytes of a compiled program with every loop counted at its trip count.

XLA's `cost_analysis()['bytes accessed']` adds each while body once, so for a train step
with gradient accumulation and scanned layer stacks it sees one microbatch through one
layer; a memory-time bound built on it is far too low. This walks the compiled HLO text
(`compiled.as_text()`) from the entry computation, charging each instruction that runs on
the chip the bytes it reads and writes, and multiplying while bodies by their trip counts:

- Only HBM counts: arrays the compiler placed on chip (memory space S(1) and up: VMEM,
  SMEM) are free to read and write, so the figure bounds HBM traffic from below.
- A fusion is one kernel that computes each element on demand: through views, copies
  and converts it reads only the slices its insides take of an operand, nothing of one
  it updates in place, and writes only the update of an in-place dynamic-update-slice;
  so the stacked buffers of a scan cost one layer per step, not the whole stack.
- An asynchronous op counts at its start: its operands read (of a slice, the slice) and
  its destination written; ConcatBitcast moves nothing.
- Where a trip count cannot be read (XLA's known_trip_count, else the counter of
  `i < N`) the body counts once; a conditional counts its cheapest branch.

With every memory space counted and bodies once (`every_memory()`, `loops=False`) it is
XLA's own convention: on a paper prior the two agree within 2%. `breakdown()` attributes
the bytes to the ops that move them (metadata op_name).
"""
from __future__ import annotations

import dataclasses
import math
import re

# Bumped whenever the counting rules change: figures counted by an older walk are stale.
WALK_VERSION = 5

_ITEM_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]"
                    r"(?:\{([\d,]*)(?::T\(([\d,]+)\))?([^}]*)\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")  # a memory space other than HBM (VMEM, SMEM)
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = ")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{[^}]*\}|(?:true|false)_computation=%[\w.\-]+")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Bookkeeping that moves no data: tuples, views and values known at compile time.
_FREE = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
                   "after-all", "add-dependency", "opt-barrier", "partition-id",
                   "replica-id"})
_SLICES = frozenset({"slice", "dynamic-slice"})
# Element-to-element ops: inside a fusion, a slice of their result reads only the
# corresponding elements of their operand.
_ON_DEMAND = frozenset({"bitcast", "copy", "convert", "reshape", "transpose", "negate",
                        "not", "abs"})


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
  """Bytes of an HLO shape ('f32[2,3]{1,0:T(8,128)}' or a tuple of them) as laid out in
  memory: the minor dimensions rounded up to the layout's tile (T(8,128) pads a 16-wide
  minor dimension to 128 lanes), as the chip moves them. Scalars count their own bytes.
  hbm_only: arrays the compiler placed on chip (layout memory space S(1) and up) count 0."""
  total = 0.0
  for dtype, dims, minor_to_major, tile, rest in _ARRAY.findall(shape):
    if hbm_only and _ON_CHIP.search(rest):
      continue
    sizes = [int(d) for d in dims.split(",") if d]
    order = [int(d) for d in minor_to_major.split(",") if d]
    if tile and len(order) == len(sizes):
      for dim, t in zip(order, reversed([int(t) for t in tile.split(",")])):
        sizes[dim] = -(-sizes[dim] // t) * t
    total += math.prod(sizes) * _ITEM_BYTES.get(dtype, 1)
  return total


def tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape '(a, (b, c), d)'; [] for an array shape."""
  shape = re.sub(r"/\*[^*]*\*/", "", shape).strip()
  if not shape.startswith("("):
    return []
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    if (ch == "," and depth == 1) or (depth == 0 and ch == ")"):
      parts.append(shape[start:i].strip())
      start = i + 1
    if depth == 0:
      break
  return [p for p in parts if p]


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]  # names of the operand instructions
  args: str  # the text inside the opcode's parentheses ('0' of parameter(0), '2' of constant(2))
  attributes: str  # what follows: calls=, body=, backend_config=, ...
  root: bool = False


def _split_balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start] ('(' or '{')."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "({":
      depth += 1
    elif text[i] in ")}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _parse_instruction(line: str) -> Instruction | None:
  head = _INSTRUCTION.match(line)
  if not head:
    return None
  rest = line[head.end():]
  if rest.startswith("("):  # a tuple shape
    end = _split_balanced(rest, 0)
  else:
    end = rest.find(" ")
  shape, rest = rest[:end], rest[end:]
  if rest.startswith("{"):  # a layout after a tuple shape
    rest = rest[_split_balanced(rest, 0):]
  op = _OPCODE.match(rest)
  if not op:
    return None
  close = _split_balanced(rest, op.end() - 1)
  args = rest[op.end():close - 1]
  return Instruction(head.group(2), shape, op.group(1), re.findall(r"%([\w.\-]+)", args),
                     args, rest[close:], root=bool(head.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation name: its instructions}, the entry computation's name)."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      if header.group(1):
        entry = header.group(2)
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      inst = _parse_instruction(line)
      if inst is not None:
        current.append(inst)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


class ModuleBytes:
  """Loop-aware bytes of one parsed HLO module."""

  def __init__(self, text: str, hbm_only: bool = True):
    """hbm_only: count only the bytes that cross HBM (True: the memory-time bound), or
    those of every memory space (False: XLA's convention, to compare with its count)."""
    self.computations, self.entry = parse_module(text)
    self._shapes = {c: {i.name: i for i in insts} for c, insts in self.computations.items()}
    self.hbm_only = hbm_only
    self._totals: dict[tuple[str, bool], float] = {}

  def every_memory(self) -> "ModuleBytes":
    """The same module counting the bytes of every memory space (no second parse)."""
    other = object.__new__(ModuleBytes)
    other.__dict__.update(self.__dict__, hbm_only=False, _totals={})
    return other

  def _bytes(self, shape: str) -> float:
    return shape_bytes(shape, self.hbm_only)

  def _constant(self, computation: str, name: str) -> int | None:
    inst = self._shapes.get(computation, {}).get(name)
    if (inst is None or inst.opcode != "constant"
        or not re.fullmatch(r"-?\d+", inst.args.strip())):
      return None
    return int(inst.args)

  def trip_count(self, computation: str, loop: Instruction) -> int:
    """The trip count of while instruction `loop` in `computation`: XLA's
    known_trip_count, else that of its counter (condition `i < N`, the body's `i + step`,
    the initial value when it is a constant, else 0 as in every jax loop), else 1."""
    known = _TRIP.search(loop.attributes)
    if known:
      return int(known.group(1))
    called = dict(_CALLED.findall(loop.attributes))
    condition, body = called.get("condition"), called.get("body")
    root = self._root(condition)
    if (root is None or root.opcode != "compare" or "direction=LT" not in root.attributes
        or len(root.operands) != 2):
      return 1
    limit = self._constant(condition, root.operands[1])
    counter = self._shapes[condition].get(root.operands[0])
    if limit is None or counter is None or counter.opcode != "get-tuple-element":
      return 1
    index = int(re.search(r"index=(\d+)", counter.attributes).group(1))
    step, start = 1, 0
    body_root = self._root(body)
    if (body_root is not None and body_root.opcode == "tuple"
        and index < len(body_root.operands)):
      update = self._shapes[body].get(body_root.operands[index])
      if update is not None and update.opcode == "add" and len(update.operands) == 2:
        step = self._constant(body, update.operands[1]) or 1
    init = self._shapes[computation].get(loop.operands[0]) if loop.operands else None
    if init is not None and init.opcode == "tuple" and index < len(init.operands):
      start = self._constant(computation, init.operands[index]) or 0
    return max(-(-(limit - start) // max(step, 1)), 1)

  def _root(self, computation: str | None) -> Instruction | None:
    return next((i for i in self.computations.get(computation, []) if i.root), None)

  def _param(self, computation: str, index: int) -> Instruction | None:
    return next((i for i in self.computations.get(computation, [])
                 if i.opcode == "parameter" and i.args.strip() == str(index)), None)

  def _read_bytes(self, computation: str, value: Instruction, full: float,
                  outer: tuple[tuple[str, Instruction], ...] = ()) -> float:
    """Bytes read of a fused computation's parameter (`full` bytes in memory), following
    `value` to its users: a fused kernel computes each element on demand, so through
    views, copies and converts only the slices taken are read, an in-place
    dynamic-update-slice reads nothing, a nested fusion reads what its own users demand
    (`outer`: the enclosing (computation, fusion) pairs); anything else reads it whole."""
    if full == 0:
      return 0.0  # on chip: no HBM read whatever the kernel takes of it
    total = 0.0
    root = self._root(computation)
    if root is not None and root.name == value.name:
      if not outer:
        return full  # the fusion's own result: every element is computed, so read
      parent, fusion = outer[-1]
      return self._read_bytes(parent, fusion, full, outer[:-1])
    for user in self.computations[computation]:
      if value.name not in user.operands:
        continue
      position = user.operands.index(value.name)
      if user.opcode in _ON_DEMAND and position == 0:
        total += self._read_bytes(computation, user, full, outer)
      elif user.opcode in _SLICES and position == 0:
        total += shape_bytes(user.shape)
      elif user.opcode == "dynamic-update-slice" and position == 0:
        continue  # updated in place: the update's bytes are the write
      elif user.opcode == "fusion":
        called = dict(_CALLED.findall(user.attributes)).get("calls")
        param = self._param(called, position)
        total += full if param is None else self._read_bytes(
            called, param, full, outer + ((computation, user),))
      else:
        return full
      if total >= full:
        return full
    return total

  def _write_bytes(self, computation: str, value: Instruction) -> float:
    """Bytes written by a fused computation's result `value`: a tuple's elements, through
    views, and only the update of an in-place dynamic-update-slice."""
    shapes = self._shapes[computation]
    if value.opcode in ("tuple", "bitcast"):
      return sum(self._write_bytes(computation, shapes[o]) for o in value.operands
                 if o in shapes)
    if value.opcode == "dynamic-update-slice" and len(value.operands) > 1:
      update = shapes.get(value.operands[1])
      return shape_bytes(update.shape) if update is not None else 0.0
    return shape_bytes(value.shape)

  def _fusion_bytes(self, fusion: Instruction, operand_bytes: list[float]) -> float:
    called = dict(_CALLED.findall(fusion.attributes)).get("calls")
    root = self._root(called)
    if root is None:
      return sum(operand_bytes) + self._bytes(fusion.shape)
    reads = 0.0
    for index, full in enumerate(operand_bytes):
      param = self._param(called, index)
      reads += full if param is None else self._read_bytes(called, param, full)
    # Each result goes where the fusion's shape places it: on chip it costs no HBM write.
    outputs = tuple_elements(fusion.shape) or [fusion.shape]
    shapes = self._shapes[called]
    results = ([shapes[o] for o in root.operands if o in shapes] if root.opcode == "tuple"
               else [root])
    if len(results) != len(outputs):
      outputs, results = [fusion.shape], [root]
    return reads + sum(self._write_bytes(called, result) for result, out in
                       zip(results, outputs) if self._bytes(out) > 0)

  def instruction_bytes(self, computation: str, inst: Instruction) -> float:
    """Bytes one (unfused) instruction moves: its operands read and its result written."""
    if inst.opcode in _FREE:
      return 0.0
    shapes = self._shapes[computation]
    operand = [self._bytes(shapes[o].shape) if o in shapes else 0.0 for o in inst.operands]
    if inst.opcode in _SLICES:  # reads the slice of its operand, writes it
      read = shape_bytes(inst.shape) if operand and operand[0] > 0 else 0.0
      return read + self._bytes(inst.shape)
    if inst.opcode.endswith("-done"):
      return 0.0  # the end of an asynchronous op: its bytes are counted at its start
    if inst.opcode.endswith("-start"):
      # Returns (destination, source, context) for a copy, ((operands), destination,
      # context) for a wrapped op: the destination is written, the operands read (of a
      # slice, only the slice).
      parts = tuple_elements(inst.shape)
      destination = (parts[1] if parts and parts[0].startswith("(") else
                     parts[0] if parts else inst.shape)
      if inst.opcode == "slice-start":
        read = shape_bytes(destination) if operand and operand[0] > 0 else 0.0
      else:
        read = sum(operand)
      return read + self._bytes(destination)
    if inst.opcode == "custom-call" and "Bitcast\"" in inst.attributes:
      return 0.0  # e.g. ConcatBitcast: reinterprets adjacent buffers, moves nothing
    if inst.opcode == "dynamic-update-slice":  # reads the update, writes it in place
      if len(operand) < 2:
        return 0.0
      written = (shape_bytes(shapes[inst.operands[1]].shape)
                 if operand[0] > 0 and inst.operands[1] in shapes else 0.0)
      return operand[1] + written
    if inst.opcode == "fusion":
      return self._fusion_bytes(inst, operand)
    return sum(operand) + self._bytes(inst.shape)

  def _visit(self, name: str, times: float, loops: bool):
    """Yields (computation, instruction, runs) for each instruction that moves data in a
    run of computation `name` that itself runs `times` times, entering while bodies
    (x trip count, or x1 with loops=False), calls and the cheapest conditional branch."""
    for inst in self.computations.get(name, []):
      called = dict(_CALLED.findall(inst.attributes))
      if inst.opcode == "while":
        trips = times * (self.trip_count(name, inst) if loops else 1)
        yield from self._visit(called["body"], trips, loops)
        yield from self._visit(called["condition"], trips, loops)
      elif inst.opcode == "conditional":
        branches = re.findall(r"%([\w.\-]+)", " ".join(_BRANCHES.findall(inst.attributes)))
        if branches:
          cheapest = min(branches, key=lambda b: self.computation_bytes(b, loops))
          yield from self._visit(cheapest, times, loops)
      elif inst.opcode == "call":
        yield from self._visit(called["to_apply"], times, loops)
      else:
        yield name, inst, times

  def computation_bytes(self, name: str, loops: bool = True) -> float:
    """Bytes of one run of computation `name`; loops=False counts each body once (XLA's
    convention, for comparison with cost_analysis)."""
    if (name, loops) not in self._totals:
      self._totals[name, loops] = sum(runs * self.instruction_bytes(computation, inst)
                                      for computation, inst, runs
                                      in self._visit(name, 1.0, loops))
    return self._totals[name, loops]

  def total(self, loops: bool = True) -> float:
    return self.computation_bytes(self.entry, loops)

  def breakdown(self) -> dict[str, float]:
    """{op_label: bytes}, loops at their trip counts; the values sum to total()."""
    out: dict[str, float] = {}
    for computation, inst, runs in self._visit(self.entry, 1.0, True):
      label = op_label(inst.attributes, inst.opcode)
      out[label] = out.get(label, 0.0) + runs * self.instruction_bytes(computation, inst)
    return out

  def top_movers(self, count: int = 8) -> list[tuple[str, float]]:
    """The `count` op labels moving most bytes (loops at their trip counts) with their
    share of the total: [(label, fraction)], largest first."""
    parts = self.breakdown()
    total = sum(parts.values()) or 1.0
    ranked = sorted(parts.items(), key=lambda kv: -kv[1])[:count]
    return [(label, value / total) for label, value in ranked]


def op_label(attributes: str, opcode: str = "") -> str:
  """Where an instruction comes from, from its metadata's op_name: the pass ('fwd' in the
  model's forward, 'bwd' in its transpose, 'step' outside it: optimizer, accumulation),
  the innermost Flax module path part ('layers.vertical', 'attn.attend') and the
  primitive, with the dropout masks' random bits as one label; the compiler's own
  instructions (no op_name) by their opcode, in parentheses."""
  found = _OP_NAME.search(attributes)
  if not found:  # the compiler's own: prefetches, layout copies, collectives
    return f"({opcode or 'unnamed'})"
  parts = found.group(1).split("/")
  stage = ("bwd" if any(p.startswith("transpose(") for p in parts) else
           "fwd" if any(p.startswith("jvp(") for p in parts) else "step")
  if "jit(_bernoulli)" in parts:
    return f"{stage} dropout mask"
  module = next((p for p in reversed(parts[:-1]) if "." in p and "(" not in p
                 and "<" not in p), "")
  return " ".join(x for x in (stage, module, parts[-1]) if x)


def loop_bytes(hlo_text: str, hbm_only: bool = True) -> tuple[float, float]:
  """(bytes with loops at their trip counts, bytes with each body once) of a module."""
  module = ModuleBytes(hlo_text, hbm_only)
  return module.total(loops=True), module.total(loops=False)



