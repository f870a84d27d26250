"""Device mesh and shardings: the one place that knows how batches and state lie over devices.

Everything is data parallel over a 1-D mesh with axis ``data`` spanning every device of every
process. The batch is split over that axis; the train state is replicated. Each process feeds
only its own slice of the global batch (``process_batch_size`` examples) and
``shard_batch`` assembles the global ``jax.Array`` from those per-process pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


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
    enable = os.environ.get('MIXER_VIT_MULTIHOST', '0') not in ('', '0', 'false', 'False')
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


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device (parameters, optimiser state)."""
  return NamedSharding(mesh, P())


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Micro-batches stacked on a leading axis ``(k, B/k, ...)``: the second axis split."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


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
  """Turns this process's numpy arrays into global arrays split over the data axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (e.g. the train state) fully on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
  """Numpy copies of replicated arrays (works on every process of a multi-host run)."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(get, tree)
