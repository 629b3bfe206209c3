"""Device mesh, shardings and host-local <-> global arrays.

One 2-D mesh ('data', 'fsdp') serves every stage. The batch is split over both axes;
parameters are replicated unless the logical axis rules (config.axis_rules) map one of
their logical axes to 'fsdp', which shards them ZeRO-3 style.

The mesh and the rules are ambient: `use_mesh(mesh, rules)` enters both once (around a
stage's run in `runner.run_stage`, around each public method of `api.Run`), and the
helpers below (`batch_sharding()`, `host_to_global(batch)`, `logical_shardings(...)`)
and the models' activation constraints (`models/sharding.py`) read them from there.
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import Any, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqvae2_jax import registry

BATCH_AXES = registry.MESH_AXES  # the mesh's axes, all of which split the batch


def maybe_initialize_distributed(dist_config) -> None:
  """Calls `jax.distributed.initialize` when the config or the environment asks for it.

  Turned on by `config.distributed.initialize=True` or the environment variable
  VQVAE2_DISTRIBUTED=1. Fields left at their defaults (coordinator_address '',
  num_processes 0, process_id -1) are not passed, so JAX detects them: on Cloud TPU VMs,
  under SLURM (`srun`) and Open MPI a bare `initialize()` finds the whole cluster, and
  JAX_COORDINATOR_ADDRESS / JAX_LOCAL_DEVICE_IDS in the environment are honoured. Local
  multi-process runs (launch/local_multiprocess.py) pass all three fields. Calling it
  again in an initialised process (several stages in one run) does nothing.

  Raises:
    ValueError: inconsistent fields, or no cluster was detected and the fields are unset.
  """
  flag = os.environ.get("VQVAE2_DISTRIBUTED", "").strip().lower()
  if not (dist_config.initialize or flag in ("1", "true", "yes", "on")):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if dist_config.coordinator_address:
    kwargs["coordinator_address"] = str(dist_config.coordinator_address)
  if int(dist_config.num_processes) > 0:
    kwargs["num_processes"] = int(dist_config.num_processes)
  if int(dist_config.process_id) >= 0:
    kwargs["process_id"] = int(dist_config.process_id)
  if ("num_processes" in kwargs and "process_id" in kwargs
      and kwargs["process_id"] >= kwargs["num_processes"]):
    raise ValueError(f"config.distributed.process_id={kwargs['process_id']} must be below "
                     f"config.distributed.num_processes={kwargs['num_processes']}")
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    raise ValueError(
        f"jax.distributed.initialize({kwargs or ''}) failed: {e}. Outside a TPU VM, SLURM "
        "or Open MPI job, set --config.distributed.coordinator_address=HOST:PORT, "
        "--config.distributed.num_processes and --config.distributed.process_id on every "
        "process (launch/local_multiprocess.py does this on one machine).") from e
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def setup_runtime(config) -> Mesh:
  """Initialises multi-host JAX if the config asks and builds its mesh (every stage;
  `runner.run_stage` enters it with `use_mesh`)."""
  maybe_initialize_distributed(config.distributed)
  return make_mesh(config.mesh)


def print0(message: str) -> None:
  """Prints progress from process 0 only (one line per job, not per host)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh; data=-1 takes all devices left after fsdp.

  Axis types are Auto so a codebook gather or other implicit resharding never fails.
  """
  devices = list(devices if devices is not None else jax.devices())
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
                     f"{len(devices)} are available; set --config.mesh.data=-1")
  auto = (jax.sharding.AxisType.Auto,) * 2
  grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES, axis_types=auto)


# What `current_mesh` raises outside `use_mesh` (one line: what to do).
NO_MESH_MESSAGE = ("no device mesh is set: call this inside `with parallel.use_mesh(mesh, "
                   "config.axis_rules):` (stages and vqvae2_jax.load(...) methods enter it)")


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules) -> Iterator[Mesh]:
  """The ambient device mesh and logical axis rules for everything inside.

  Enters `jax.set_mesh(mesh)` and flax's `nn.logical_axis_rules(rules)`: the helpers of
  this module read the mesh (`current_mesh`) and the rules from here, and the models'
  block outputs traced inside are constrained to the batch-sharded layout
  (`models/sharding.py`; outside, those constraints are no-ops). Entering the mesh that
  is already ambient again (a `Run` method calling another) changes nothing.

  Args:
    mesh: the concrete device mesh (`make_mesh`).
    rules: logical axis rules, e.g. config.axis_rules ((logical name, mesh axes), ...).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(_plain_rules(rules)):
    yield mesh


def mesh_is_set() -> bool:
  """Whether a concrete mesh is ambient (for code that also runs on one device without
  one, e.g. feature extraction in a notebook)."""
  return not jax.sharding.get_mesh().empty


def current_mesh() -> Mesh:
  """The ambient concrete mesh (entered by `use_mesh`); raises when there is none."""
  if not mesh_is_set():
    raise RuntimeError(NO_MESH_MESSAGE)
  return jax.sharding.get_mesh()


@contextlib.contextmanager
def on_one_device(device: jax.Device) -> Iterator[Mesh]:
  """A 1 x 1 ('data', 'fsdp') mesh over `device` as the ambient mesh (the logical axis
  rules unchanged): a computation pinned to one device (the codec's loop, whose host
  callbacks run in order) runs there under any ambient mesh, which jit would otherwise
  refuse for arguments on fewer devices than the mesh."""
  mesh = make_mesh(types.SimpleNamespace(data=1, fsdp=1), [device])
  with jax.set_mesh(mesh):
    yield mesh


def batch_sharding() -> NamedSharding:
  """Leading (batch) axis split over every device of the ambient mesh."""
  return NamedSharding(current_mesh(), P(BATCH_AXES))


def replicated() -> NamedSharding:
  """Fully replicated placement on the ambient mesh."""
  return NamedSharding(current_mesh(), P())


def check_batch_size(global_batch: int, what: str = "batch_size") -> None:
  """Raises unless the global batch splits evenly over the ambient mesh's devices."""
  size = current_mesh().size
  if global_batch % size:
    raise ValueError(f"{what}={global_batch} must be divisible by the {size} devices "
                     "of the mesh")


def host_to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Host-local arrays (this process's slice of the global batch) -> global jax.Arrays
  split over the ambient mesh."""
  sharding = batch_sharding()
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def global_to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) global array gathered to a NumPy array on every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shared_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that EVERY process holds whole (the same values: a batch of generated
  candidates, a gathered validation batch) -> a global jax.Array with `sharding`.

  Each process reads only the rows its own devices hold (`x` may be a memmap), so the
  work of a batch is split over the processes and their devices; unlike
  `host_to_global`, the leading axis of `x` is the global batch, not this process's
  slice of it.
  """
  x = np.asarray(x) if not isinstance(x, np.ndarray) else x
  return jax.make_array_from_callback(x.shape, sharding, lambda index: np.asarray(x[index]))


def is_main_process() -> bool:
  """True on the process that writes a stage's files (reports, pictures, records)."""
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (`name` must match); a no-op on one
  process. Used after process 0 writes files the others read next."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def main_process_value(value: Any) -> Any:
  """Process 0's `value` (a pytree of NumPy-compatible leaves) on every process: decisions
  that must agree everywhere (what to resume, what is left to do)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value))


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on at least one of them."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def _plain_rules(rules) -> tuple:
  """Axis rules as flax wants them (config lists -> tuples)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in rules)


def unboxed(tree: Any) -> Any:
  """`tree` with flax's axis-metadata boxes (nn.Partitioned, ...) stripped, values as they
  are: `nn.unbox` would also pin each value to its logical sharding under the ambient
  rules, which fails on abstract values outside a trace and would add constraints to a
  trace (an initialisation) that the layouts of its outputs already fix."""
  def strip(x):
    if isinstance(x, nn.Partitioned):
      return unboxed(x.unbox(apply_constraint=False))
    return unboxed(x.unbox()) if isinstance(x, nn.meta.AxisMetadata) else x
  return jax.tree.map(strip, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def logical_shardings(abstract_boxed: Any) -> Any:
  """NamedShardings on the ambient mesh, under the ambient logical axis rules, for a tree
  of (possibly nn.Partitioned-boxed) abstract values.

  Leaves without logical names are replicated, and so is any dimension the mesh axes it
  maps to do not divide (e.g. a 3-channel RGB kernel under fsdp=8): such a parameter is
  small, and splitting it unevenly would fail at placement.
  """
  mesh = current_mesh()
  specs = nn.get_partition_spec(abstract_boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, nn.get_logical_axis_rules())
  shapes = unboxed(abstract_boxed)

  def divisible(sharding: NamedSharding, leaf) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
    for d, axes in enumerate(spec):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      if leaf.shape[d] % size:
        spec[d] = None
    return NamedSharding(mesh, P(*spec[:len(leaf.shape)]))

  return jax.tree.map(divisible, shardings, shapes,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def to_dtype(name: str):
  """'bfloat16' -> jnp.bfloat16, for each of registry.DTYPES."""
  if name not in registry.DTYPES:
    raise KeyError(name)
  return getattr(jnp, name)
