"""Device mesh and shardings: the one place that knows how batches and state lie over devices.

The mesh is 2-D, ``(data, fsdp)``, over every device of every process (``config.mesh.fsdp``
devices along ``fsdp``, the rest along ``data``; the default ``fsdp = 1`` is pure data
parallelism). The batch is split over both axes, in the devices' order, so each process feeds only
its own slice of the global batch (``process_batch_size`` examples) and ``shard_batch`` assembles
the global ``jax.Array`` from those per-process pieces, whatever the mesh's shape.

The train state (parameters and optimiser state) is sharded over the ``fsdp`` axis and replicated
over ``data`` (``state_shardings``): each leaf of at least ``MIN_SHARDED_SIZE`` elements is split
along its largest dimension divisible by the ``fsdp`` axis size (the last of equal ones), smaller
leaves (biases, norms, step counters) are whole on every device. ``config.mesh.rules`` overrides
this by name: ``((regex, spec), ...)``, the first pattern that matches the end of a leaf's
'/'-joined path wins (``'head/kernel'`` matches ``params/head/kernel`` and the optimiser's moments
of it), and its spec is a ``PartitionSpec`` as a tuple (``(None, 'fsdp')``; ``()``: replicated).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import os
import re
from typing import Any, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from mixer_vit.runtime import env

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # The batch is split over both.
# Leaves with fewer elements stay replicated: sharding them saves little and costs a collective.
MIN_SHARDED_SIZE = 2**14


def maybe_initialize_distributed(enable: bool | None = None) -> None:
  """Calls ``jax.distributed.initialize`` for multi-host runs.

  Enabled by ``enable=True`` or, when ``enable`` is None, by the environment variable
  ``MIXER_VIT_MULTIHOST=1``. Coordinator address, process count and id come from JAX's usual
  sources (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or the cluster
  auto-detection on TPU pods / SLURM).

  On CPU the processes exchange data with gloo over TCP, jax's default
  ``jax_cpu_collectives_implementation`` (env ``JAX_CPU_COLLECTIVES_IMPLEMENTATION``; ``mpi`` is
  the alternative); ``tests/test_multiprocess.py`` trains with two local processes this way.
  """
  if enable is None:
    enable = env.flag('MIXER_VIT_MULTIHOST', False)
  if enable:
    # jax reads JAX_COORDINATOR_ADDRESS itself but not the process count and id.
    kwargs = {}
    for name, var in (('num_processes', 'JAX_NUM_PROCESSES'), ('process_id', 'JAX_PROCESS_ID')):
      if os.environ.get(var):
        kwargs[name] = int(os.environ[var])
    jax.distributed.initialize(**kwargs)
    logging.info(
      'jax.distributed: process %d of %d, %d local / %d global devices',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
    )


# ---------------------------------------------------------------------------------------------
# The mesh.


def make_mesh(devices: Sequence[jax.Device] | None = None, fsdp: int = 1) -> Mesh:
  """The ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process).

  ``fsdp`` neighbouring devices (in ``jax.devices()`` order, so a host's devices first) form
  one ``fsdp`` group; ``len(devices) // fsdp`` groups lie along ``data``.
  """
  devices = jax.devices() if devices is None else list(devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(
      f'config.mesh.fsdp={fsdp} must be >= 1 and divide the number of devices '
      f'({len(devices)}); e.g. --config.mesh.fsdp={math.gcd(max(fsdp, 1), len(devices))}.'
    )
  grid = np.asarray(devices, dtype=object).reshape(len(devices) // fsdp, fsdp)
  return Mesh(grid, BATCH_AXES)


class MeshSettings(NamedTuple):
  """``config.mesh`` read once: devices along ``fsdp`` and the sharding ``rules``."""

  fsdp: int = 1
  rules: tuple = ()


def mesh_settings(config: Any) -> MeshSettings:
  """``(fsdp, rules)`` of a training config (configs written before ``mesh`` existed: (1, ()))."""
  mesh = config.get('mesh') or {}
  return MeshSettings(int(mesh.get('fsdp', 1) or 1), tuple(mesh.get('rules', ()) or ()))


def mesh_from_config(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """``make_mesh(devices, config.mesh.fsdp)``; ``config`` may be its ``MeshSettings``."""
  settings = config if isinstance(config, MeshSettings) else mesh_settings(config)
  return make_mesh(devices, settings.fsdp)


def fsdp_size(mesh: Mesh) -> int:
  """Devices along the ``fsdp`` axis (1 for a mesh without one)."""
  return dict(mesh.shape).get(FSDP_AXIS, 1)


def check_mesh(config: Any, mesh: Mesh) -> None:
  """Raises when ``mesh`` was not made for ``config.mesh.fsdp`` (a mesh passed in by a caller);
  ``config`` may be its ``MeshSettings``."""
  fsdp = (config if isinstance(config, MeshSettings) else mesh_settings(config)).fsdp
  if fsdp_size(mesh) != fsdp:
    raise ValueError(
      f'the mesh has {fsdp_size(mesh)} devices along {FSDP_AXIS!r} but config.mesh.fsdp is '
      f'{fsdp}; make it with parallel.mesh_from_config(config, devices).'
    )


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device (both mesh axes), other axes whole."""
  return NamedSharding(mesh, P(_batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device."""
  return NamedSharding(mesh, P())


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Micro-batches stacked on a leading axis ``(k, B/k, ...)``: the second axis split."""
  return NamedSharding(mesh, P(None, _batch_axes(mesh)))


# ---------------------------------------------------------------------------------------------
# The train state's shardings.


def path_name(path: Sequence[Any]) -> str:
  """``'params/Transformer/encoder_norm/scale'`` for a ``jax.tree_util`` key path."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def default_spec(shape: Sequence[int], fsdp: int) -> P:
  """The largest dimension divisible by ``fsdp`` (the last of equal ones) over the ``fsdp``
  axis; replicated when ``fsdp`` is 1, the leaf is smaller than ``MIN_SHARDED_SIZE`` or no
  dimension divides."""
  if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  candidates = [(size, i) for i, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  _, dim = max(candidates)
  spec = [None] * len(shape)
  spec[dim] = FSDP_AXIS
  return P(*spec)


def _rule_spec(name: str, shape: Sequence[int], spec: Any, pattern: str, mesh: Mesh) -> P:
  spec = tuple(spec)
  axes = [a for part in spec for a in (part if isinstance(part, (tuple, list)) else (part,))]
  unknown = [a for a in axes if a is not None and a not in mesh.axis_names]
  where = f'config.mesh.rules: the spec {spec} of {pattern!r} (matching {name}, shape {shape})'
  if unknown or len(spec) > len(shape):
    raise ValueError(
      f'{where} names axes {unknown} (the mesh has {mesh.axis_names})'
      if unknown
      else f'{where} has more entries than the leaf has dimensions'
    )
  for dim, part in enumerate(spec):
    parts = part if isinstance(part, (tuple, list)) else (part,)
    split = math.prod(dict(mesh.shape)[a] for a in parts if a is not None)
    if shape[dim] % split:
      raise ValueError(f'{where}: dimension {dim} is not divisible by {split} devices')
  return P(*(tuple(p) if isinstance(p, list) else p for p in spec))


def state_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = ()) -> Any:
  """A ``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s, e.g.
  ``jax.eval_shape`` of the state's init): ``rules`` first, then ``default_spec``."""
  fsdp = fsdp_size(mesh)
  compiled = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'config.mesh.rules: {rule!r} is not a (regex, spec) pair.')
    try:
      compiled.append((re.compile(rf'(?:^|.*/)(?:{rule[0]})'), rule[0], rule[1]))
    except re.error as e:
      raise ValueError(
        f'config.mesh.rules: {rule[0]!r} is not a regular expression ({e}).'
      ) from None

  def sharding(path, leaf):
    name, shape = path_name(path), tuple(np.shape(leaf))
    for regex, pattern, spec in compiled:
      if regex.fullmatch(name):
        return NamedSharding(mesh, _rule_spec(name, shape, spec, pattern, mesh))
    return NamedSharding(mesh, default_spec(shape, fsdp))

  return jax.tree_util.tree_map_with_path(sharding, tree)


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """The most bytes one device holds of ``tree`` laid out with ``shardings``."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    shard = sharding.shard_shape(tuple(leaf.shape))
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


# ---------------------------------------------------------------------------------------------
# Per-process input.


def mesh_process_indices(mesh: Mesh) -> list[int]:
  """Sorted ids of the processes that own devices of ``mesh``."""
  return sorted({d.process_index for d in mesh.devices.flat})


def process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """The number of examples this process must feed for a global batch of ``global_batch_size``."""
  if global_batch_size % mesh.size:
    raise ValueError(
      f'batch size {global_batch_size} is not divisible by the {mesh.size} devices of the '
      f'mesh; choose a multiple of {mesh.size} (e.g. --config.batch_size='
      f'{max(mesh.size, global_batch_size // mesh.size * mesh.size)}).'
    )
  num_processes = len(mesh_process_indices(mesh))
  return global_batch_size // num_processes


def process_shard(mesh: Mesh | None = None) -> tuple[int, int]:
  """``(index, count)`` of this process among those feeding ``mesh``: which data slice to read."""
  if mesh is None:
    return jax.process_index(), jax.process_count()
  processes = mesh_process_indices(mesh)
  return processes.index(jax.process_index()), len(processes)


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Turns this process's numpy arrays into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree fully on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
  """Full numpy copies of the arrays of ``tree`` on every process.

  Replicated arrays are read from a local copy; arrays sharded over several processes are
  gathered, a collective: with more than one process, every process must call it.
  """
  leaves, treedef = jax.tree.flatten(tree)
  gather = [
    i
    for i, x in enumerate(leaves)
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated
  ]
  gathered = (
    multihost_utils.process_allgather([leaves[i] for i in gather], tiled=True) if gather else []
  )
  out = []
  for i, x in enumerate(leaves):
    if i in gather:
      x = gathered[gather.index(i)]
    elif isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    out.append(np.asarray(x))
  return jax.tree.unflatten(treedef, out)
