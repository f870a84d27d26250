"""The set-up of a training run, written once: the trainer, ``memory`` and ``benchmark`` call it.

``RunSettings.from_config`` reads what the loop needs from a training config into typed objects,
checking them once: the global batch, ``steps.StepSettings`` (loss, ``accum_steps``, EMA decay)
and ``parallel.MeshSettings`` (``mesh.fsdp``, ``mesh.rules``); ``check_batch`` is the one check that
the batch splits into micro-batches over the devices. ``RunPlan.from_config`` adds what needs the
config but not the data (the mesh checked, the schedule and optimiser), and ``RunPlan.build``
what needs the data's class count and image shape: a ``RunSetup`` with the model, the init
function, the abstract train state, its shardings, and the jitted steps. ``make`` does both.

Pure JAX like ``steps``: no data pipeline, no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import ml_collections
import optax

from mixer_vit.runtime import parallel
from mixer_vit.training import optim
from mixer_vit.training import steps


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """What the training loop reads from its config, read and checked once."""

  batch_size: int  # Global, over every device of every process.
  step: steps.StepSettings
  mesh: parallel.MeshSettings

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> RunSettings:
    return cls(
      batch_size=int(config.batch_size),
      step=steps.StepSettings.from_config(config),
      mesh=parallel.mesh_settings(config),
    )

  def check_batch(self, num_devices: int, flag: str = '--config.batch_size') -> None:
    """Raises unless the batch splits into ``accum_steps`` micro-batches over the devices; the
    error names ``flag``, where the batch size was given."""
    b, k = self.batch_size, self.step.accum_steps
    if b <= 0 or b % (k * num_devices):
      raise ValueError(
        f'{flag}={b}: the batch size must be a positive multiple of accum_steps ({k}) times '
        f'the number of devices ({num_devices}), i.e. divisible by {k * num_devices}; e.g. {flag}='
        f'{max(1, b // (k * num_devices)) * k * num_devices}.'
      )


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """A run's model, train state layout and jitted steps (``RunPlan.build``)."""

  settings: RunSettings
  mesh: jax.sharding.Mesh
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  model_config: ml_collections.ConfigDict
  model: Any  # The flax module.
  image_shape: tuple[int, ...]  # (H, W, C) of one training image.
  init: Callable[[jax.Array], steps.TrainState]  # key -> the step-0 state (jit it).
  abstract: steps.TrainState  # Its shapes and dtypes (jax.ShapeDtypeStruct leaves).
  shardings: steps.TrainState  # A NamedSharding per leaf, over ``mesh``.

  def sharded_abstract(self) -> steps.TrainState:
    """The abstract state with its shardings: a restore target, or the input of ``lower``."""
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      self.abstract,
      self.shardings,
    )

  def init_state(self, key: jax.Array) -> steps.TrainState:
    """A freshly initialised state, laid out with ``shardings``."""
    return jax.jit(self.init, out_shardings=self.shardings)(key)

  def state_from_params(self, params: Any) -> steps.TrainState:
    """The step-0 state around given (e.g. pretrained) parameters, laid out with ``shardings``."""
    ema = self.settings.step.ema
    return jax.jit(
      lambda p: steps.state_from_params(p, self.tx, ema), out_shardings=self.shardings
    )(jax.device_put(params, self.shardings.params))

  def train_step(self):
    """The jitted train step (``steps.make_train_step``) for this state's layout."""
    return steps.make_train_step(
      self.model, self.tx, self.schedule, self.settings.step, self.mesh, self.shardings
    )

  def eval_step(self):
    """The jitted evaluation step (``steps.make_eval_step``), parameters laid out as trained."""
    return steps.make_eval_step(self.model, self.settings.step, self.mesh, self.shardings.params)


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What a training config fixes before any data is read: settings, mesh, schedule, optimiser."""

  config: ml_collections.ConfigDict
  settings: RunSettings
  mesh: jax.sharding.Mesh
  schedule: optax.Schedule
  tx: optax.GradientTransformation

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
  ) -> RunPlan:
    """Reads and checks ``config`` (settings, the mesh it asks for, the batch over the mesh) and
    builds the schedule and optimiser; ``mesh`` defaults to the config's over every device."""
    settings = RunSettings.from_config(config)
    mesh = mesh or parallel.mesh_from_config(settings.mesh)
    parallel.check_mesh(settings.mesh, mesh)
    settings.check_batch(mesh.size)
    schedule = optim.make_schedule(config)
    return cls(config, settings, mesh, schedule, optim.make_optimizer(config, schedule))

  def build(self, num_classes: int, image_shape: tuple[int, ...]) -> RunSetup:
    """The model for ``num_classes`` and ``(H, W, C)`` images, and the state's abstract layout
    (``jax.eval_shape``: nothing is allocated)."""
    image_shape = tuple(image_shape)
    model_config, model = steps.make_model(self.config, num_classes, image_shape[:2])
    steps.stage_weights(model, self.settings.step)  # One loss weight per stage of a cascade.
    init = steps.make_init_fn(model, self.tx, image_shape, self.settings.step.ema)
    abstract = jax.eval_shape(init, jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    shardings = parallel.state_shardings(abstract, self.mesh, self.settings.mesh.rules)
    return RunSetup(
      self.settings,
      self.mesh,
      self.schedule,
      self.tx,
      model_config,
      model,
      image_shape,
      init,
      abstract,
      shardings,
    )


def make(
  config: ml_collections.ConfigDict,
  num_classes: int,
  image_shape: tuple[int, ...],
  mesh: jax.sharding.Mesh | None = None,
) -> RunSetup:
  """``RunPlan.from_config(config, mesh).build(num_classes, image_shape)``."""
  return RunPlan.from_config(config, mesh).build(num_classes, image_shape)
