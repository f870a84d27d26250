"""The model, train state and jitted steps of a training config: pure JAX, no I/O.

``make_model`` turns a training config into the flax module; ``make_init_fn`` builds the
``TrainState`` (step, parameters, optimiser state); ``make_train_step`` and ``make_eval_step`` are
the jitted functions the trainer, the evaluation command and the benchmark all run, with explicit
shardings from ``mixer_vit.runtime.parallel`` (batch split over every device; the state replicated, or
sharded over the mesh's ``fsdp`` axis when ``state_sharding`` says so).

EMA (``config.ema_decay`` = d in (0, 1); 0 / None: off, the default). The state is then an
``EmaTrainState``: a ``TrainState`` plus ``ema_params``, a float32 tree like ``params``, set to
the initial (or pretrained) parameters at step 0 and updated inside the jitted train step after
the optimiser's update: ``ema <- ema + (1 - d) * (params - ema)``, i.e. ``d * ema + (1 - d) *
params`` with no warm-up or bias correction, so after n steps ``ema_n = d**n * params_0 +
sum_{k=1..n} (1 - d) * d**(n - k) * params_k``. Written that way a parameter that does not move
(``config.frozen`` / ``trainable``) keeps its EMA equal to it exactly. With EMA off the state is the
plain ``TrainState``, its tree (and so its checkpoints) as without this feature.

Cascades (``models.dvt``, whose model has ``num_stages``): the training loss is the sum over the
stages of each stage's loss, weighted by ``config.stage_loss_weights`` (one weight per stage; empty:
every weight 1); the evaluation counts each stage's correct predictions too
(``test_accuracy_stage<k>``), the main metrics being the last stage's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mixer_vit import models
from mixer_vit.runtime import parallel
from mixer_vit.training import losses

DTYPES = ('float32', 'bfloat16', 'float16')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates done so far.
  params: Any
  opt_state: Any


@flax.struct.dataclass
class EmaTrainState(TrainState):
  """A ``TrainState`` with an exponential moving average of the parameters (module docstring)."""

  ema_params: Any  # float32, the tree of `params`.


def ema_decay(config: ml_collections.ConfigDict) -> float | None:
  """``config.ema_decay`` as a float in (0, 1), or None when EMA is off (absent, None or 0)."""
  decay = config.get('ema_decay')
  if not decay:
    return None
  if not 0.0 < float(decay) < 1.0:
    raise ValueError(
      f'config.ema_decay must be in (0, 1) (0: off), got {decay}; e.g. 0.9999 for long runs, '
      'about 1 - 10 / total_steps for short ones (it averages over about 1 / (1 - decay) steps).'
    )
  return float(decay)


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the jitted steps read from a training config, read (and checked) once by
  ``from_config``: the loss, the micro-batches per step and the EMA decay (None: off)."""

  loss: str = 'softmax_xent'
  accum_steps: int = 1
  ema_decay: float | None = None
  stage_loss_weights: tuple[float, ...] = ()  # Cascades: one per stage; (): every weight 1.

  @property
  def ema(self) -> bool:
    """Whether the train state carries EMA parameters."""
    return self.ema_decay is not None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> StepSettings:
    losses.get_loss_fn(config.loss)  # A known loss.
    k = int(config.get('accum_steps', 1))
    if k < 1:
      raise ValueError(f'accum_steps must be >= 1 (got {k}).')
    weights = tuple(float(w) for w in config.get('stage_loss_weights', ()) or ())
    if any(w < 0 for w in weights) or (weights and not any(weights)):
      raise ValueError(
        f'config.stage_loss_weights={weights}: weights must be >= 0 and not all 0; e.g. '
        "(1.0, 1.0, 1.0) for the sum of the stages' losses."
      )
    return cls(
      loss=config.loss, accum_steps=k, ema_decay=ema_decay(config), stage_loss_weights=weights
    )


def step_settings(settings: StepSettings | ml_collections.ConfigDict) -> StepSettings:
  """``settings`` as ``StepSettings`` (a training config is read with ``from_config``)."""
  return settings if isinstance(settings, StepSettings) else StepSettings.from_config(settings)


def ema_params_of(state: Any) -> Any:
  """The EMA parameters of a train state, or None when it has none."""
  return state.ema_params if isinstance(state, EmaTrainState) else None


def _ema_start(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):  # An abstract state (a restore target).
    return jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding)
  return jnp.array(x, dtype=jnp.float32, copy=True)  # Own buffers: the train step donates both.


def with_ema(state: TrainState, ema: bool) -> TrainState:
  """``state`` with EMA parameters (a float32 copy of its parameters when it had none) or, with
  ``ema`` False, without them; unchanged when it already is so. Also for abstract states."""
  has = isinstance(state, EmaTrainState)
  if ema and not has:
    ema_params = jax.tree.map(_ema_start, state.params)
    return EmaTrainState(state.step, state.params, state.opt_state, ema_params)
  if has and not ema:
    return TrainState(state.step, state.params, state.opt_state)
  return state


def num_stages(model: Any) -> int | None:
  """The stages of a cascade model (``models.dvt``); None for any other model."""
  return getattr(model, 'num_stages', None)


def stage_weights(model: Any, settings: StepSettings) -> tuple[float, ...] | None:
  """The weight of each stage's loss of a cascade (checked against its stages); None otherwise."""
  k = num_stages(model)
  weights = settings.stage_loss_weights
  if k is None:
    if weights:
      raise ValueError(
        f'config.stage_loss_weights={weights} is for cascade models (family dvt); set it to ().'
      )
    return None
  if not weights:
    return (1.0,) * k
  if len(weights) != k:
    raise ValueError(
      f'config.stage_loss_weights has {len(weights)} weights but the model has {k} stages; give '
      'one per stage, or () for the plain sum.'
    )
  return weights


def update_ema(ema_params: Any, params: Any, decay: float) -> Any:
  """One EMA step: ``ema + (1 - decay) * (params - ema)`` per leaf, in float32."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema_params, params)


def make_model(
  config: ml_collections.ConfigDict, num_classes: int, image_size: tuple[int, int] | None = None
) -> tuple[ml_collections.ConfigDict, Any]:
  """The model config (registry entry + ``config.model`` overrides) and its flax module.

  ``num_classes`` comes from the data set, ``image_size`` (H, W) from the training images, so the
  model config written with a run describes the trained model exactly.
  """
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype {config.dtype!r} is not one of {DTYPES}.')
  overrides = config.model.to_dict() if config.get('model') else {}
  overrides.update(num_classes=num_classes, dtype=config.dtype)
  if config.get('matmul_dtype'):
    overrides['matmul_dtype'] = config.matmul_dtype
  if image_size is not None:
    overrides['image_size'] = tuple(image_size)
  model_config = models.get_model_config(config.model_name, **overrides)
  return model_config, models.build_model(model_config)


def make_init_fn(
  model, tx: optax.GradientTransformation, image_shape: tuple[int, ...], ema: bool = False
) -> Callable[[jax.Array], TrainState]:
  """``key -> TrainState`` at step 0 with freshly initialised parameters (jit it); with ``ema``
  an ``EmaTrainState`` whose EMA starts at those parameters."""

  def init(key):
    images = jnp.zeros((1, *image_shape), jnp.float32)
    params = model.init({'params': key}, images, train=False)['params']
    return state_from_params(params, tx, ema)

  return init


def state_from_params(
  params: Any, tx: optax.GradientTransformation, ema: bool = False
) -> TrainState:
  """A step-0 ``TrainState`` around given (e.g. pretrained) parameters (jit it); with ``ema`` an
  ``EmaTrainState`` whose EMA starts at them."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return with_ema(state, ema)


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B/k, ...) where micro-batch j holds rows j, j+k, j+2k, ...

  Every device holds a contiguous slice of the batch, so interleaving keeps each micro-batch
  spread evenly over all devices (no data moves)."""
  x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def make_train_step(
  model,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  settings: StepSettings | ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  state_sharding: Any = None,
) -> Callable[
  [TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict[str, jax.Array]]
]:
  """A jitted ``(state, batch, rng) -> (state, metrics)``; ``state`` is donated.

  ``state_sharding``: a ``TrainState`` of shardings (``parallel.state_shardings``) the state
  comes in and goes out with, the gradients laid out like the parameters; default: replicated.

  Dropout keys are ``fold_in(rng, step)`` (and the micro-batch index), so they depend only on the
  step, not on the devices. With ``accum_steps = k`` the batch is cut into k micro-batches whose
  gradients are averaged in a ``lax.scan``: one optimiser update per step. An ``EmaTrainState``
  also gets its EMA step (``update_ema`` with ``config.ema_decay``) after the update.
  ``settings``: ``StepSettings`` (or the training config they are read from).
  """
  settings = step_settings(settings)
  loss_fn = losses.get_loss_fn(settings.loss)
  weights = stage_weights(model, settings)
  decay = settings.ema_decay
  k = settings.accum_steps
  micro_sharding = parallel.micro_batch_sharding(mesh)
  repl = parallel.replicated(mesh)
  if state_sharding is None:
    state_sharding = repl
  grad_sharding = state_sharding if state_sharding is repl else state_sharding.params
  # Gradients (and their accumulator) lie like the parameters: reduce-scattered under FSDP.
  constrain = lambda g: jax.lax.with_sharding_constraint(g, grad_sharding)  # noqa: E731

  def loss_and_grads(params, images, labels, key):
    def mean_loss(p):
      if weights is not None:
        logits = model.apply(
          {'params': p}, images, train=True, all_stages=True, rngs={'dropout': key}
        )
        return sum(w * jnp.mean(loss_fn(x, labels)) for w, x in zip(weights, logits))
      logits = model.apply({'params': p}, images, train=True, rngs={'dropout': key})
      return jnp.mean(loss_fn(logits, labels))

    loss, grads = jax.value_and_grad(mean_loss)(params)
    return loss, constrain(grads)

  def train_step(state, batch, rng):
    key = jax.random.fold_in(rng, state.step)
    if k == 1:
      loss, grads = loss_and_grads(state.params, batch['image'], batch['labels'], key)
    else:
      inputs = {'image': batch['image'], 'labels': batch['labels']}
      micro = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(_micro_batches(x, k), micro_sharding), inputs
      )

      def accumulate(carry, inputs):
        index, mb = inputs
        key_j = jax.random.fold_in(key, index)
        loss, grads = loss_and_grads(state.params, mb['image'], mb['labels'], key_j)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), constrain(jax.tree.map(jnp.zeros_like, state.params)))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
      loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if isinstance(state, EmaTrainState):
      if decay is None:
        raise ValueError('the train state has EMA parameters but config.ema_decay is off.')
      new_state = new_state.replace(ema_params=update_ema(state.ema_params, params, decay))
    # param_norm also catches updates that went non-finite while the loss was still finite.
    return new_state, {
      'loss': loss,
      'grad_norm': optax.global_norm(grads),
      'param_norm': optax.global_norm(params),
      'lr': schedule(state.step),
    }

  return jax.jit(
    train_step,
    in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl),
    out_shardings=(state_sharding, repl),
    donate_argnums=(0,),
  )


def make_eval_step(
  model,
  settings: StepSettings | ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  params_sharding: Any = None,
) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """A jitted ``(params, batch) -> sums`` over the rows whose ``mask`` is True; the parameters
  laid out as ``params_sharding`` (default: replicated). ``settings``: ``StepSettings`` (or the
  training config), for the loss."""
  loss_fn = losses.get_loss_fn(step_settings(settings).loss)
  cascade = num_stages(model) is not None

  def eval_step(params, batch):
    mask = batch['mask'].astype(bool)
    label = jnp.argmax(batch['labels'], axis=-1)
    stage_sums = {}
    if cascade:
      stages = model.apply({'params': params}, batch['image'], train=False, all_stages=True)
      stages = stages.astype(jnp.float32)
      hits = (jnp.argmax(stages, axis=-1) == label) & mask
      stage_sums['correct_stage'] = jnp.sum(hits, axis=-1, dtype=jnp.int32)
      logits = stages[-1]
    else:
      logits = model.apply({'params': params}, batch['image'], train=False).astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, label[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # 0 when the label scores highest.
    correct = (jnp.argmax(logits, axis=-1) == label) & mask
    return {  # Counts in int32: exact for any split size.
      'correct': jnp.sum(correct, dtype=jnp.int32),
      'correct_top5': jnp.sum((rank < 5) & mask, dtype=jnp.int32),
      'loss': jnp.sum(jnp.where(mask, loss_fn(logits, batch['labels']), 0.0)),
      'count': jnp.sum(mask, dtype=jnp.int32),
      **stage_sums,
    }

  repl = parallel.replicated(mesh)
  return jax.jit(
    eval_step,
    in_shardings=(params_sharding or repl, parallel.batch_sharding(mesh)),
    out_shardings=repl,
  )


def _scores(totals: Mapping[str, Any], num_classes: int, suffix: str = '') -> dict[str, float]:
  count = int(totals['count'])
  result = {
    f'test_accuracy{suffix}': int(totals['correct']) / count,
    f'test_loss{suffix}': float(totals['loss']) / count,
  }
  if num_classes > 5:
    result[f'test_top5_accuracy{suffix}'] = float(totals['correct_top5']) / count
  for k, correct in enumerate(totals.get('correct_stage', ())):
    result[f'test_accuracy_stage{k}{suffix}'] = int(correct) / count
  return result


def evaluate(
  eval_step,
  params,
  batches: Iterable[Mapping[str, jax.Array]],
  num_classes: int,
  what: str,
  ema_params: Any = None,
) -> dict[str, float]:
  """Exact metrics over every batch of ``batches`` (padding rows masked out).

  ``what`` names the split in the error raised when it is empty. With ``ema_params`` those are
  evaluated on the same batches too: ``test_accuracy_ema``, ``test_loss_ema``, ...
  """
  totals = None
  for batch in batches:
    sums = {'': eval_step(params, batch)}
    if ema_params is not None:
      sums['_ema'] = eval_step(ema_params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f'{what} is empty.')
  totals = parallel.to_host(totals)
  result = {}
  for suffix, sums in totals.items():
    result.update(_scores(sums, num_classes, suffix))
  result['test_examples'] = int(totals['']['count'])
  return result
