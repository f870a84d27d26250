"""The training loop: pretraining and fine-tuning for every model, data set and device count.

``train_and_evaluate(config, workdir)`` trains ``config.model_name`` on ``config.dataset`` for
``config.total_steps`` steps with the jitted steps of ``mixer_vit.training.steps``, data parallel over a
device mesh (``mixer_vit.runtime.parallel``), and writes the run to ``workdir`` (``mixer_vit.workdir``
lists its files). Restarting with the same workdir resumes from the latest checkpoint at the same
data position (a checkpoint that cannot be restored is moved aside and the one before used). A
relaunch whose config changes what is trained is refused, only one run at a time may use a
workdir, and a folder of other files is never written to (``mixer_vit.workdir``). The final
step's checkpoint and ``params.npz`` are written before the final evaluation, so a failing
evaluation loses no training. Image folders are checked before the first step (empty class
folders, images of another size where the preprocessing does not resize). This module only runs the loop: tools import ``steps`` and
``workdir``, not it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from mixer_vit import data
from mixer_vit import models
from mixer_vit import workdir as workdir_lib
from mixer_vit.runtime import parallel
from mixer_vit.runtime import paths
from mixer_vit.training import config_utils
from mixer_vit.training import fewshot
from mixer_vit.training import metrics
from mixer_vit.training import run_setup
from mixer_vit.training import steps
from mixer_vit.training import stopping


class NonFiniteLossError(FloatingPointError):
  """The loss, the gradients or the parameters became NaN or infinite; training stopped."""


# ---------------------------------------------------------------------------------------------
# The loop.


def _check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> run_setup.RunPlan:
  """What can be checked before the data is read or anything written; returns the run's plan
  (settings, mesh and batch checked, schedule and optimiser)."""
  config_utils.check_positive(config)  # Steps, batch and model sizes: the key named.
  steps.make_model(config, num_classes=1)  # The model name and keys.
  plan = run_setup.RunPlan.from_config(config, mesh)  # EMA, loss, accum_steps, mesh, batch.
  data.DataConfig.from_config(config)
  for key in ('pp_train', 'pp_test'):
    try:
      data.preprocess.parse(config[key])
    except ValueError as e:
      raise ValueError(f'config.{key}: {e}') from None
  for key in ('log_every', 'eval_every', 'checkpoint_every'):
    if config[key] <= 0:
      raise ValueError(f'{key} must be positive (got {config[key]}).')
  return plan


@dataclasses.dataclass
class _History:
  """Train-step outputs since the last log line, checked for NaN/inf before every log and save.

  ``pending`` holds device values not looked at yet (reading them waits for the step), ``seen``
  their host copies, averaged by ``summary``.
  """

  pending: list = dataclasses.field(default_factory=list)  # (step, device metrics)
  seen: list = dataclasses.field(default_factory=list)  # host metrics

  def check_finite(self, workdir: str, last_saved: int | None):
    values = parallel.to_host([m for _, m in self.pending])
    for (step, _), row in zip(self.pending, values):
      bad = {
        k: float(row[k])
        for k in ('loss', 'grad_norm', 'param_norm')
        if not math.isfinite(float(row[k]))
      }
      if bad:
        kept = (
          f'The checkpoint of step {last_saved} in {workdir}/'
          f'{workdir_lib.CHECKPOINT_DIR} is kept (a restart resumes from it).'
          if last_saved is not None
          else 'No checkpoint was written.'
        )
        raise NonFiniteLossError(
          f'Non-finite training values at step {step}: {bad}. Training stopped. {kept} Lower '
          'config.lr, raise config.warmup_steps or check the data.'
        )
    self.seen.extend(values)
    self.pending = []

  def summary(self) -> dict[str, float]:
    """Means over the checked steps (the last learning rate); starts a new interval."""
    result = {k: float(np.mean([v[k] for v in self.seen])) for k in self.seen[0]}
    result['lr'] = float(self.seen[-1]['lr'])
    self.seen = []
    return result


def _check_pretrained(path: str):
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
      f'config.pretrained={path!r} does not exist. Download a released checkpoint (e.g. wget '
      'https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz) or give the '
      'params.npz of a finished run: --config.pretrained=PATH.'
    )


def _initial_state(pretrained: str | None, setup: run_setup.RunSetup, key) -> steps.TrainState:
  """From scratch, or from ``pretrained`` (head replaced, position embeddings resized)."""
  if not pretrained:
    return setup.init_state(key)
  init_params = parallel.to_host(jax.jit(lambda k: setup.init(k).params)(key))
  params = models.load_pretrained(pretrained, init_params, setup.model_config)
  logging.info('Initialised from %s.', pretrained)
  return setup.state_from_params(params)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: jax.sharding.Mesh | None = None,
  stop_after_step: int | None = None,
) -> dict[str, Any]:
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
    workdir.ConfigChangeError: the workdir holds a run of another config (nothing written).
    workdir.WorkdirBusyError: another run trains in the workdir (nothing written).
    workdir.WorkdirError: ``workdir`` is empty, a file, a folder of other files, unwritable, or a
      finished run without checkpoints (nothing written); or the disk filled up (one line; the
      checkpoints written before are kept).
    workdir.CheckpointRestoreError: no checkpoint of the workdir can be restored.
  """
  mesh = mesh or parallel.mesh_from_config(config)
  plan = _check_config(config, mesh)  # Settings, schedule and optimiser.
  primary = jax.process_index() == 0
  total = config.total_steps
  # Refused relaunches and bad settings end here, with the workdir as it was.
  workdir_lib.check_ownership(workdir)  # A folder of other files is refused, untouched.
  workdir_lib.check_config_change(workdir, config)
  if config.pretrained and not workdir_lib.checkpoint_steps(workdir):
    _check_pretrained(config.pretrained)
  info = data.get_info(config)
  data.check_image_sizes(config)  # Image folders: one size per split, or a resize.

  lock = workdir_lib.lock_workdir(workdir)  # One writer, from before its first write.
  manager = writer = train_iter = None
  try:
    ownership = workdir_lib.check_ownership(workdir)  # Again, now under the lock.
    if primary:
      workdir_lib.mark_workdir(workdir, ownership)
    launch = workdir_lib.check_config_change(workdir, config)
    start_step = launch.checkpoints[-1] if launch.checkpoints else 0
    train_iter = data.make_train_iterator(config, mesh, start_step)
    batch = next(train_iter)
    image_shape = tuple(batch['image'].shape[1:])
    setup = plan.build(info.num_classes, image_shape)  # The state's shardings: this run's mesh.
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
    if start_step:
      abstract = setup.sharded_abstract()
      state, restored = workdir_lib.restore_newest(workdir, config, abstract, move_aside=True)
      state = steps.with_ema(state, setup.settings.step.ema)  # A forced change.
      if restored != start_step:  # The newest could not be restored: data from the older one.
        train_iter.close()
        start_step = restored
        train_iter = data.make_train_iterator(config, mesh, start_step)
        batch = next(train_iter)
      logging.info('Resumed from the checkpoint of step %d in %s.', start_step, workdir)
    else:
      state = _initial_state(config.pretrained, setup, init_key)
    manager = workdir_lib.make_manager(workdir, config)
    workdir_lib.quiet_closed_loops()  # A failed save (full disk): one error, not a traceback each.
    if primary:
      metrics.discard_after(workdir, start_step, evaluations_at_step=start_step >= total)
      workdir_lib.record_launch(workdir, launch, start_step)
      workdir_lib.write_run_files(workdir, config, info, image_shape)
    writer = metrics.make_writer(workdir, primary)
    dropout_key = parallel.replicate(dropout_key, mesh)
    train_step = setup.train_step()
    eval_step = setup.eval_step()
    fewshot_eval = fewshot.make_evaluator(
      config, setup.model, mesh
    )  # None: config.fewshot_every = 0.

    throughput = metrics.Throughput(config.batch_size, total, start_step)
    history = _History()
    last_saved = start_step or None
    result: dict[str, Any] = {'step': start_step, 'stopped_early': False}

    def run_eval(step):
      throughput.pause()
      batches = data.make_eval_iterator(config, mesh)
      values = steps.evaluate(
        eval_step,
        state.params,
        batches,
        info.num_classes,
        f'the test split {config.test_split!r} of {config.dataset!r}',
        ema_params=steps.ema_params_of(state),
      )
      writer.write_scalars(step, values)
      metrics.log(metrics.console_line(step, total, values))
      result.update(values, step=step)
      throughput.resume()

    if start_step >= total:
      logging.info('Already trained to step %d of %d; evaluating only.', start_step, total)
      # Written again: a run stopped between its final checkpoint and params.npz has none.
      params = parallel.to_host((state.params, steps.ema_params_of(state)))  # Every process.
      if primary:
        workdir_lib.save_params(workdir, *params)
      run_eval(start_step)
    started = time.perf_counter()
    with (
      stopping.Preemption() as preemption
    ):  # Until the end: a SIGTERM after the last step is ignored.
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
        if final:  # The trained state is kept before the final evaluation, which may fail.
          history.check_finite(workdir, last_saved)
          throughput.pause()
          workdir_lib.save_checkpoint(manager, step, state, force=True)
          last_saved = step
          params = parallel.to_host((state.params, steps.ema_params_of(state)))  # Every process.
          if primary:
            workdir_lib.save_params(workdir, *params)
          throughput.resume()
        if step % config.eval_every == 0 or final:
          run_eval(step)
        if fewshot_eval and fewshot_eval.due(step, final):
          throughput.pause()
          result.update(fewshot_eval.run_and_write(step, total, state.params, writer))
          throughput.resume()
        if not final and (stop or manager.should_save(step)):
          history.check_finite(workdir, last_saved)
          throughput.pause()
          workdir_lib.save_checkpoint(manager, step, state, force=True)
          last_saved = step
          throughput.resume()
        if stop:
          logging.warning(
            'Stopped after step %d of %d and saved a checkpoint in %s; run the same '
            'command again to resume.',
            step,
            total,
            workdir,
          )
          result['stopped_early'] = True
          break
      manager.wait_until_finished()
    # From the first step on: compilation, evaluations and checkpoints included, set-up not.
    result['train_seconds'] = time.perf_counter() - started
    logging.info(
      'Steps %d-%d took %s (compilation, evaluation and checkpoints included).',
      start_step + 1,
      result['step'],
      metrics.format_duration(result['train_seconds']),
    )
  except Exception as e:
    full = paths.disk_full_reason(e)
    if full is None:
      raise
    raise workdir_lib.WorkdirError(
      f'no space left to write in {workdir} ({full}): free some space, or move the workdir to '
      'another disk, then run the same command again (it resumes from its last checkpoint).'
    ) from e
  finally:
    try:
      for part in (train_iter, manager, writer):
        if part is not None:
          part.close()
    finally:
      lock.release()
  return result
