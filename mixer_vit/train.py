"""Pretraining and fine-tuning: one loop for every model, data set and device count.

``train_and_evaluate(config, workdir)`` trains ``config.model_name`` on ``config.dataset`` for
``config.total_steps`` steps, data parallel over a device mesh (``mixer_vit.parallel``): the batch
is split over the ``data`` axis, the train state is replicated and donated to a jitted step.
Restarting with the same workdir resumes from the latest checkpoint at the same data position.

Workdir contents (everything another tool needs to rebuild the model and its data):
  checkpoints/<step>/   Orbax train-state checkpoints (parameters, optimiser state, step).
  config.json           the resolved config.
  dataset_info.json     class count and names, input image shape, split sizes.
  metrics.jsonl         one JSON object per write: {"step": S, ...}.
  events.out.tfevents.* TensorBoard.
  params.npz            the final parameters (mixer_vit.checkpoint file layout).

``load_workdir(workdir)`` returns the model and its latest parameters from such a workdir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mixer_vit import checkpoint
from mixer_vit import checkpointing
from mixer_vit import config_utils
from mixer_vit import data
from mixer_vit import losses
from mixer_vit import metrics
from mixer_vit import models
from mixer_vit import optim
from mixer_vit import parallel

CONFIG_FILE = 'config.json'
DATASET_INFO_FILE = 'dataset_info.json'
PARAMS_FILE = 'params.npz'
DTYPES = ('float32', 'bfloat16', 'float16')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates done so far.
  params: Any
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  """The loss, the gradients or the parameters became NaN or infinite; training stopped."""


# ---------------------------------------------------------------------------------------------
# Model, state and steps.


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                image_size: tuple[int, int] | None = None
                ) -> tuple[ml_collections.ConfigDict, Any]:
  """The model config (registry entry + ``config.model`` overrides) and the flax module.

  ``num_classes`` comes from the data set, ``image_size`` (H, W) from the training images, so the
  model config written with a run describes the trained model exactly.
  """
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype {config.dtype!r} is not one of {DTYPES}.')
  overrides = config.model.to_dict() if config.get('model') else {}
  overrides.update(num_classes=num_classes, dtype=config.dtype)
  if image_size is not None:
    overrides['image_size'] = tuple(image_size)
  model_config = models.get_model_config(config.model_name, **overrides)
  return model_config, models.build_model(model_config)


def _init_fn(model, tx: optax.GradientTransformation, image_shape: tuple[int, ...]
             ) -> Callable[[jax.Array], TrainState]:
  def init(key):
    params = model.init({'params': key}, jnp.zeros((1, *image_shape), jnp.float32),
                        train=False)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B/k, ...) where micro-batch j holds rows j, j+k, j+2k, ...

  Every device holds a contiguous slice of the batch, so interleaving keeps each micro-batch
  spread evenly over all devices (no data moves)."""
  x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                    ) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted ``(state, batch, rng) -> (state, metrics)``; ``state`` is donated.

  Dropout keys are ``fold_in(rng, step)`` (and the micro-batch index), so they depend only on the
  step, not on the devices. With ``accum_steps = k`` the batch is cut into k micro-batches whose
  gradients are averaged in a ``lax.scan``: one optimiser update per step.
  """
  loss_fn = losses.get_loss_fn(config.loss)
  k = config.accum_steps
  micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, parallel.DATA_AXIS))

  def loss_and_grads(params, images, labels, key):
    def mean_loss(p):
      logits = model.apply({'params': p}, images, train=True, rngs={'dropout': key})
      return jnp.mean(loss_fn(logits, labels))
    return jax.value_and_grad(mean_loss)(params)

  def train_step(state, batch, rng):
    key = jax.random.fold_in(rng, state.step)
    if k == 1:
      loss, grads = loss_and_grads(state.params, batch['image'], batch['labels'], key)
    else:
      micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
          _micro_batches(x, k), micro_sharding), {'image': batch['image'],
                                                   'labels': batch['labels']})

      def accumulate(carry, inputs):
        index, mb = inputs
        loss, grads = loss_and_grads(state.params, mb['image'], mb['labels'],
                                     jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
      loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    # param_norm also catches updates that went non-finite while the loss was still finite.
    return new_state, {'loss': loss, 'grad_norm': optax.global_norm(grads),
                       'param_norm': optax.global_norm(params), 'lr': schedule(state.step)}

  repl = parallel.replicated(mesh)
  return jax.jit(train_step, in_shardings=(repl, parallel.batch_sharding(mesh), repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def make_eval_step(model, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """A jitted ``(params, batch) -> sums`` over the rows whose ``mask`` is True."""
  loss_fn = losses.get_loss_fn(config.loss)

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['image'], train=False).astype(jnp.float32)
    mask = batch['mask'].astype(bool)
    label = jnp.argmax(batch['labels'], axis=-1)
    label_logit = jnp.take_along_axis(logits, label[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # 0 when the label scores highest.
    return {  # Counts in int32: exact for any split size.
        'correct': jnp.sum((jnp.argmax(logits, axis=-1) == label) & mask, dtype=jnp.int32),
        'correct_top5': jnp.sum((rank < 5) & mask, dtype=jnp.int32),
        'loss': jnp.sum(jnp.where(mask, loss_fn(logits, batch['labels']), 0.0)),
        'count': jnp.sum(mask, dtype=jnp.int32),
    }

  repl = parallel.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(repl, parallel.batch_sharding(mesh)),
                 out_shardings=repl)


def evaluate(eval_step, params, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
             num_classes: int) -> dict[str, float]:
  """Exact metrics over the whole test split (padding rows masked out)."""
  totals = None
  for batch in data.make_eval_iterator(config, mesh):
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f'the test split {config.test_split!r} of {config.dataset!r} is empty.')
  totals = to_host(totals)
  count = int(totals['count'])
  result = {
      'test_accuracy': int(totals['correct']) / count,
      'test_loss': float(totals['loss']) / count,
      'test_examples': count,
  }
  if num_classes > 5:
    result['test_top5_accuracy'] = float(totals['correct_top5']) / count
  return result


def to_host(tree: Any) -> Any:
  """Numpy copies of replicated arrays (works on every process of a multi-host run)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)


# ---------------------------------------------------------------------------------------------
# Stopping on SIGTERM.


class _Preemption:
  """Tells the loop to save and stop: on SIGTERM (single process), or at the preemption sync
  point JAX's coordination service sets on every host (multi-host)."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # No preemption service.
        return False
    return self._flag.is_set()


# ---------------------------------------------------------------------------------------------
# The loop.


def _check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  k = config.accum_steps
  if k < 1:
    raise ValueError(f'accum_steps must be >= 1 (got {k}).')
  if config.batch_size % (k * mesh.size):
    raise ValueError(
        f'batch_size {config.batch_size} must be divisible by accum_steps ({k}) times the '
        f'number of devices ({mesh.size}); e.g. --config.batch_size='
        f'{max(1, config.batch_size // (k * mesh.size)) * k * mesh.size}.')
  if config.total_steps < 0:
    raise ValueError(f'total_steps must be >= 0 (got {config.total_steps}).')
  for key in ('log_every', 'eval_every', 'checkpoint_every'):
    if config[key] <= 0:
      raise ValueError(f'{key} must be positive (got {config[key]}).')


def _write_json(path: str, value: Any):
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(value if isinstance(value, str) else json.dumps(value, indent=2))
  os.replace(tmp, path)


@dataclasses.dataclass
class _History:
  """Train-step outputs since the last log line, checked for NaN/inf before every log and save.

  ``pending`` holds device values not looked at yet (reading them waits for the step), ``seen``
  their host copies, averaged by ``summary``.
  """
  pending: list = dataclasses.field(default_factory=list)  # (step, device metrics)
  seen: list = dataclasses.field(default_factory=list)  # host metrics

  def check_finite(self, workdir: str, last_saved: int | None):
    values = to_host([m for _, m in self.pending])
    for (step, _), row in zip(self.pending, values):
      bad = {k: float(row[k]) for k in ('loss', 'grad_norm', 'param_norm')
             if not math.isfinite(float(row[k]))}
      if bad:
        kept = (f'The checkpoint of step {last_saved} in {workdir}/'
                f'{checkpointing.CHECKPOINT_DIR} is kept (a restart resumes from it).'
                if last_saved is not None else 'No checkpoint was written.')
        raise NonFiniteLossError(
            f'Non-finite training values at step {step}: {bad}. Training stopped. {kept} Lower '
            'config.lr, raise config.warmup_steps or check the data.')
    self.seen.extend(values)
    self.pending = []

  def summary(self) -> dict[str, float]:
    """Means over the checked steps (the last learning rate); starts a new interval."""
    result = {k: float(np.mean([v[k] for v in self.seen])) for k in self.seen[0]}
    result['lr'] = float(self.seen[-1]['lr'])
    self.seen = []
    return result


def _check_pretrained(path: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'config.pretrained={path!r} does not exist. Download a released checkpoint (e.g. wget '
        'https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz) or give the '
        'params.npz of a finished run: --config.pretrained=PATH.')


def _initial_state(config, model, model_config, tx, image_shape, key, mesh) -> TrainState:
  """From scratch, or from ``config.pretrained`` (head replaced, position embeddings resized)."""
  repl = parallel.replicated(mesh)
  init = _init_fn(model, tx, image_shape)
  if not config.pretrained:
    return jax.jit(init, out_shardings=repl)(key)
  _check_pretrained(config.pretrained)
  init_params = to_host(jax.jit(lambda k: init(k).params)(key))
  params = checkpoint.load_pretrained(config.pretrained, init_params, model_config)
  logging.info('Initialised from %s.', config.pretrained)
  return jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                 out_shardings=repl)(parallel.replicate(params, mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None,
                       stop_after_step: int | None = None) -> dict[str, Any]:
  """Trains (or resumes training) and evaluates; returns the last logged values.

  Args:
    config: A training config (see ``configs/`` and ``config_utils.base_config``).
    workdir: Where checkpoints, metrics and the final parameters go; resumes from it.
    mesh: Devices to use (default: every device of every process).
    stop_after_step: Save a checkpoint and stop after this step, as on SIGTERM, even when
      ``total_steps`` is larger (for time-sliced jobs); the schedule still spans ``total_steps``.

  Returns:
    The last logged values: ``step``, ``loss``, ``lr``, ``test_accuracy``, ``test_examples``, ...,
    ``stopped_early`` (True after SIGTERM or ``stop_after_step``) and ``train_seconds`` (wall time
    from the first step to the end, set-up excluded).

  Raises:
    NonFiniteLossError: the loss, gradients or parameters became NaN/inf; the checkpoints written
      before are kept.
  """
  mesh = mesh or parallel.make_mesh()
  _check_config(config, mesh)
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  total = config.total_steps

  info = data.get_info(config)
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config, schedule)
  manager = checkpointing.make_manager(workdir, config)
  writer = metrics.make_writer(workdir, primary)
  train_iter = None
  try:
    start_step = manager.latest_step() or 0
    train_iter = data.make_train_iterator(config, mesh, start_step)
    batch = next(train_iter)
    image_shape = tuple(batch['image'].shape[1:])
    model_config, model = build_model(config, info.num_classes, image_shape[:2])
    if primary:
      _write_json(os.path.join(workdir, CONFIG_FILE), config_utils.to_json(config))
      _write_json(os.path.join(workdir, DATASET_INFO_FILE), {
          'num_classes': info.num_classes,
          'class_names': list(info.class_names) if info.class_names is not None else None,
          'image_shape': list(image_shape),
          'num_examples': dict(info.num_examples),
      })

    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
    if start_step:
      abstract = checkpointing.abstract_like(
          jax.eval_shape(_init_fn(model, tx, image_shape), init_key), parallel.replicated(mesh))
      state = checkpointing.restore(manager, abstract, start_step)
      logging.info('Resumed from the checkpoint of step %d in %s.', start_step, workdir)
    else:
      state = _initial_state(config, model, model_config, tx, image_shape, init_key, mesh)
    dropout_key = parallel.replicate(dropout_key, mesh)
    train_step = make_train_step(model, tx, schedule, config, mesh)
    eval_step = make_eval_step(model, config, mesh)

    throughput = metrics.Throughput(config.batch_size, total, start_step)
    history = _History()
    last_saved = start_step or None
    result: dict[str, Any] = {'step': start_step, 'stopped_early': False}

    def run_eval(step):
      throughput.pause()
      values = evaluate(eval_step, state.params, config, mesh, info.num_classes)
      writer.write_scalars(step, values)
      metrics.log(metrics.console_line(step, total, values))
      result.update(values, step=step)
      throughput.resume()

    if start_step >= total:
      logging.info('Already trained to step %d of %d; evaluating only.', start_step, total)
      run_eval(start_step)
    started = time.perf_counter()
    with _Preemption() as preemption:
      for step in range(start_step + 1, total + 1):  # `step` = updates done after this one.
        state, step_metrics = train_step(state, batch, dropout_key)
        history.pending.append((step, step_metrics))
        final = step == total
        stop = not final and (preemption.reached(step) or step == stop_after_step)
        if not (final or stop):
          batch = next(train_iter)  # Overlaps with the step running on the devices.
        if step % config.log_every == 0 or final or stop:
          history.check_finite(workdir, last_saved)
          values = history.summary()
          values.update(throughput.update(step))
          writer.write_scalars(step, {k: v for k, v in values.items() if k != 'eta_s'})
          metrics.log(metrics.console_line(step, total, values))
          result.update(values, step=step)
        if step % config.eval_every == 0 or final:
          run_eval(step)
        if final or stop or manager.should_save(step):
          history.check_finite(workdir, last_saved)
          throughput.pause()
          checkpointing.save(manager, step, state, force=True)
          last_saved = step
          throughput.resume()
        if stop:
          logging.warning('Stopped after step %d of %d and saved a checkpoint in %s; run the same '
                          'command again to resume.', step, total, workdir)
          result['stopped_early'] = True
          break
    manager.wait_until_finished()
    if primary and not result['stopped_early']:
      checkpoint.save_npz(to_host(state.params), os.path.join(workdir, PARAMS_FILE))
    # From the first step on: compilation, evaluations and checkpoints included, set-up not.
    result['train_seconds'] = time.perf_counter() - started
    logging.info('Steps %d-%d took %s (compilation, evaluation and checkpoints included).',
                 start_step + 1, result['step'], metrics.format_duration(result['train_seconds']))
  finally:
    if train_iter is not None:
      train_iter.close()
    manager.close()
    writer.close()
  return result


# ---------------------------------------------------------------------------------------------
# Reading a workdir back.


@dataclasses.dataclass
class TrainedModel:
  """What ``load_workdir`` returns: enough to run the model on new images."""
  config: ml_collections.ConfigDict  # The training config (data keys give the preprocessing).
  model_config: ml_collections.ConfigDict
  model: Any  # flax module: model.apply({'params': params}, images, train=False).
  params: Any  # Host (numpy) arrays.
  class_names: list[str] | None
  image_shape: tuple[int, ...]  # (H, W, 3) the model was trained on.
  step: int


def load_workdir(workdir: str, step: int | None = None) -> TrainedModel:
  """The model, config and parameters of the latest (or the given) checkpoint in ``workdir``.

  Works while the training still runs (reads the newest finished checkpoint) and on any device
  count; the parameters come back as numpy arrays.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir} is not a training workdir (run '
                            'python -m mixer_vit.main --workdir=... first).')
  with open(path, encoding='utf-8') as f:
    config = config_utils.from_json(f.read())
  with open(os.path.join(workdir, DATASET_INFO_FILE), encoding='utf-8') as f:
    info = json.load(f)
  image_shape = tuple(info['image_shape'])
  model_config, model = build_model(config, info['num_classes'], image_shape[:2])
  tx = optim.make_optimizer(config)
  manager = checkpointing.make_manager(workdir, config, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {workdir}/{checkpointing.CHECKPOINT_DIR}.')
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = checkpointing.abstract_like(
        jax.eval_shape(_init_fn(model, tx, image_shape), jax.random.PRNGKey(0)), sharding)
    state = checkpointing.restore(manager, abstract, step)
  finally:
    manager.close()
  return TrainedModel(config=config, model_config=model_config, model=model,
                      params=jax.device_get(state.params), class_names=info['class_names'],
                      image_shape=image_shape, step=step)
