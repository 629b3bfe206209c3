"""TPU slices by their Cloud names, as compile-only devices on any host.

`slice_devices("v5e-8")` returns the devices of that slice from libtpu's topology
description (`jax.experimental.topologies.get_topology_desc`): no TPU is needed, and XLA's
TPU compiler compiles for them on a CPU host. Names follow Cloud TPU's accelerator types:
v4-N and v5p-N count TensorCores (N / 2 megacore chips, each one JAX device), v5e-N (also
v5litepod-N) and v6e-N count chips. "2xv5e-256" is two slices joined over the data-centre
network (multislice).

Chip figures are Cloud TPU's published per-chip peaks: bf16 matmul FLOP/s, HBM bytes and
HBM bandwidth. They turn the compiler's FLOPs and bytes into bounds (`aot.analysis`).
"""
from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip generation (one JAX device per chip)."""
  generation: str  # topology prefix: v4, v5e, v5p, v6e
  peak_bf16_flops: float  # per second
  hbm_bytes: int
  hbm_bytes_per_s: float
  counts_cores: bool  # accelerator type counts TensorCores (2 per chip), not chips
  megacore: bool


GIB = 1 << 30
CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GIB, 1228e9, counts_cores=True, megacore=True),
    "v5e": Chip("v5e", 197e12, 16 * GIB, 819e9, counts_cores=False, megacore=False),
    "v5p": Chip("v5p", 459e12, 95 * GIB, 2765e9, counts_cores=True, megacore=True),
    "v6e": Chip("v6e", 918e12, 32 * GIB, 1640e9, counts_cores=False, megacore=False),
}
ALIASES = {"v5litepod": "v5e", "v6": "v6e", "v5": "v5p"}
# Chip layouts of the slice shapes Cloud TPU offers (chips -> dims).
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}
EXAMPLES = "v4-8, v5e-8, v5p-8, v6e-8, v5e-256, v5p-128, 2xv5e-256"


class TopologyError(ValueError):
  """A slice name this module cannot turn into devices (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """A parsed slice name: chip generation, chip layout and number of slices."""
  name: str
  chip: Chip
  dims: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(self.dims) * self.num_slices

  @property
  def topology_name(self) -> str:
    """libtpu's name of one slice, e.g. 'v5e:2x4'."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.dims))}"


def parse(name: str) -> Slice:
  """'v5e-8' | 'v5litepod-16' | 'v5p-128' | '2xv5e-256' | 'v5e:4x4' -> Slice."""
  m = re.fullmatch(r"(?:(\d+)x)?(v\d+[a-z]*)([-:])([\dx]+)", name.strip().lower())
  if not m:
    raise TopologyError(f"unknown TPU slice {name!r}; use a Cloud TPU type such as {EXAMPLES}")
  slices, gen, sep, size = int(m.group(1) or 1), m.group(2), m.group(3), m.group(4)
  gen = ALIASES.get(gen, gen)
  if gen not in CHIPS:
    raise TopologyError(f"unknown TPU generation {m.group(2)!r} in {name!r}; known: "
                        f"{', '.join(CHIPS)} (e.g. {EXAMPLES})")
  chip = CHIPS[gen]
  table = SHAPES_3D if chip.counts_cores else SHAPES_2D
  if sep == ":":  # libtpu's own layout name
    dims = tuple(int(d) for d in size.split("x") if d)
    if len(dims) != len(next(iter(table.values()))) or not all(dims):
      raise TopologyError(f"{name!r}: a {gen} layout has {len(next(iter(table.values())))} "
                          "dimensions, e.g. " + ("v5p:2x2x1" if chip.counts_cores else "v5e:2x4"))
  else:
    if not size.isdigit():
      raise TopologyError(f"unknown TPU slice {name!r}; use a Cloud TPU type such as {EXAMPLES}")
    count = int(size) // 2 if chip.counts_cores else int(size)
    if count not in table:
      unit = "TensorCores" if chip.counts_cores else "chips"
      sizes = ", ".join(f"{gen}-{c * 2 if chip.counts_cores else c}" for c in table)
      raise TopologyError(f"{name!r}: no {gen} slice of {size} {unit}; known sizes: {sizes}")
    dims = table[count]
  return Slice(name, chip, dims, slices)


def slice_devices(slice_: Slice | str) -> list:
  """Compile-only JAX devices of the slice (needs libtpu; no TPU, no network)."""
  s = parse(slice_) if isinstance(slice_, str) else slice_
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - part of jax
    raise TopologyError(f"jax.experimental.topologies is missing: {e}") from e
  dims3 = tuple(s.dims) + (1,) * (3 - len(s.dims))
  single_host = math.prod(s.dims) <= (4 if s.chip.counts_cores else 8)
  host = dims3 if single_host else (2, 2, 1)
  wrap = tuple(d >= 4 and min(s.dims) >= 4 for d in dims3)
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=s.topology_name,
        chip_config_name="megacore" if s.chip.megacore else "default",
        chips_per_host_bounds=host, num_slices=s.num_slices, wrap=wrap)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "libtpu" in text.lower() or isinstance(e, (ImportError, RuntimeError)):
      raise TopologyError(f"cannot describe {s.name} without libtpu ({text}); install it "
                          "with pip install -e '.[tpu]'") from e
    raise TopologyError(f"libtpu refused {s.name} ({s.topology_name}): {text}") from e
  return list(desc.devices)
