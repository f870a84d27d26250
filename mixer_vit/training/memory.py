"""Memory of the training step, read before launch: XLA's ``memory_analysis`` of the compiled step.

``train_step_memory`` compiles the trainer's own step (``run_setup``: ``steps.make_train_step``,
with the state laid out by ``parallel.state_shardings`` over the config's mesh) on abstract inputs
(``jax.eval_shape``: no parameter is allocated) and reports XLA's per-device bytes. ``dry_run``
does it for a training config (``python -m mixer_vit.main ... --dry_run``); the benchmark command
for a model name (``python -m mixer_vit.benchmark --model=ViT-g_14 --train --memory --fsdp=8``).

The bytes are one device's share of the SPMD program: ``arguments`` (parameters, optimiser state,
the batch and the key), ``outputs`` (the new state and the metrics), ``aliased`` (outputs written
in place of donated arguments: the state), ``temporaries`` (activations kept for the backward
pass, gradients, XLA's scratch space) and ``total`` = arguments + outputs - aliased + temporaries,
the peak XLA plans for. ``state`` is the train state's share computed from its shardings alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mixer_vit.runtime import parallel
from mixer_vit.training import run_setup


@dataclasses.dataclass
class MemoryReport:
  model: str
  parameters: int
  batch_size: int  # Global.
  image_shape: tuple[int, ...]
  dtype: str
  accum_steps: int
  remat: str  # 'off', or the remat_policy.
  devices: int
  fsdp: int
  state_bytes: int  # Per device, from the shardings.
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  generated_code_bytes: int

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'total_bytes': self.total_bytes}

  def summary(self) -> str:
    gib = lambda b: f'{b / 2**30:8.3f} GiB'  # noqa: E731
    h, w = self.image_shape[:2]
    return '\n'.join(
      [
        f'{self.model} train step: {self.parameters / 1e6:.1f} M parameters, global batch '
        f'{self.batch_size} at {h}x{w}, {self.dtype}, accum_steps {self.accum_steps}, remat '
        f'{self.remat}; {self.devices} {jax.default_backend()} devices, mesh data='
        f'{self.devices // self.fsdp} x fsdp={self.fsdp}',
        'per device (XLA memory_analysis of the compiled step):',
        f'  arguments:    {gib(self.argument_bytes)}  (train state {gib(self.state_bytes)} of it)',
        f'  outputs:      {gib(self.output_bytes)}  (aliased to donated arguments: '
        f'{gib(self.alias_bytes)})',
        f'  temporaries:  {gib(self.temp_bytes)}',
        f'  total:        {gib(self.total_bytes)}  (arguments + outputs - aliased + temporaries)',
      ]
    )


def train_step_memory(
  config: ml_collections.ConfigDict,
  num_classes: int,
  image_shape: tuple[int, ...],
  mesh: jax.sharding.Mesh | None = None,
) -> MemoryReport:
  """Compiles the train step of ``config`` for ``(H, W, C)`` images on ``mesh`` (default: the
  config's) and returns its per-device memory; nothing is allocated on the devices."""
  setup = run_setup.make(config, num_classes, image_shape, mesh)
  mesh, abstract = setup.mesh, setup.abstract
  b, batch_sharding = setup.settings.batch_size, parallel.batch_sharding(mesh)
  batch = {
    'image': jax.ShapeDtypeStruct((b, *image_shape), jnp.float32, sharding=batch_sharding),
    'labels': jax.ShapeDtypeStruct((b, num_classes), jnp.float32, sharding=batch_sharding),
  }
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(mesh))
  step = setup.train_step()
  analysis = step.lower(setup.sharded_abstract(), batch, rng).compile().memory_analysis()
  if analysis is None:
    raise ValueError(f'the {jax.default_backend()} backend reports no memory analysis.')
  model_config = setup.model_config
  return MemoryReport(
    model=model_config.name,
    parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
    batch_size=b,
    image_shape=tuple(image_shape),
    dtype=config.dtype,
    accum_steps=setup.settings.step.accum_steps,
    remat=model_config.remat_policy if model_config.remat else 'off',
    devices=mesh.size,
    fsdp=parallel.fsdp_size(mesh),
    state_bytes=parallel.bytes_per_device(abstract, setup.shardings),
    argument_bytes=int(analysis.argument_size_in_bytes),
    output_bytes=int(analysis.output_size_in_bytes),
    alias_bytes=int(analysis.alias_size_in_bytes),
    temp_bytes=int(analysis.temp_size_in_bytes),
    generated_code_bytes=int(analysis.generated_code_size_in_bytes),
  )


def train_image_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The shape of one preprocessed training image: static from the pipeline when ``pp_train``
  fixes it (e.g. ends with a crop or resize), else read from the first training example."""
  from mixer_vit import data  # noqa: PLC0415  The pipeline (TensorFlow) only where one is read.

  ds = data.local_train_dataset(config, 0, 1, 1)
  shape = ds.element_spec['image'].shape[1:]
  if shape.is_fully_defined():
    return tuple(shape.as_list())
  return tuple(next(iter(ds.take(1).as_numpy_iterator()))['image'].shape[1:])


def dry_run(config: ml_collections.ConfigDict, mesh=None) -> MemoryReport:
  """The memory of ``config``'s train step on this machine's devices (``--dry_run``): reads the
  data set's class count and image shape, compiles, writes nothing."""
  from mixer_vit import data  # noqa: PLC0415  The pipeline (TensorFlow) only where one is read.

  info = data.get_info(config)
  return train_step_memory(config, info.num_classes, train_image_shape(config), mesh)
