"""Orbax train-state checkpoints: the manager, saving, restoring (the newest that restores)."""

from __future__ import annotations

import sys
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from mixer_vit.runtime import paths
from mixer_vit.training import steps
from mixer_vit.workdir import files
from mixer_vit.workdir.files import CORRUPT_SUFFIX
from mixer_vit.workdir.files import CheckpointRestoreError


def make_manager(
  workdir: str, config: ml_collections.ConfigDict | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
  """A manager for ``workdir``'s train-state checkpoints, following the config's policy."""
  every = config.checkpoint_every if config is not None else 1
  keep = config.keep_checkpoints if config is not None else None
  async_save = bool(config.get('async_checkpoints', True)) if config is not None else False
  if every is not None and every <= 0:
    raise ValueError(f'checkpoint_every must be positive (got {every}).')
  options = ocp.CheckpointManagerOptions(
    save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every or 1),
    preservation_policy=ocp.checkpoint_managers.LatestN(keep or None),
    enable_async_checkpointing=async_save,
    read_only=read_only,
    create=not read_only,
    # Left by a save that was cut short (kill -9); only the one writer (WorkdirLock) removes them.
    cleanup_tmp_directories=not read_only,
  )
  # The handler named up front lets `has_ema` read a checkpoint's tree before any save / restore.
  return ocp.CheckpointManager(
    files.checkpoint_dir(workdir), options=options, item_handlers=ocp.StandardCheckpointHandler()
  )


def save_checkpoint(
  manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False
) -> bool:
  """Saves ``state`` at ``step`` when the policy says so (always with ``force``)."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def has_ema(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether the checkpoint of ``step`` holds EMA parameters (``steps.EmaTrainState``)."""
  metadata = manager.item_metadata(step)
  tree = getattr(metadata, 'tree', metadata)
  return isinstance(tree, dict) and 'ema_params' in tree


def restore_checkpoint(
  manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> Any:
  """The state saved at ``step`` (default: the latest), laid out like ``abstract_state``
  (a tree of ``jax.ShapeDtypeStruct`` with shardings, e.g. from ``abstract_like``).

  The state comes back as it was saved, with or without EMA parameters whatever
  ``abstract_state`` has (``steps.with_ema`` converts it); the EMA is laid out like the
  parameters."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}.')
  abstract_state = steps.with_ema(abstract_state, has_ema(manager, step))
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract_like(tree: Any, sharding: Any) -> Any:
  """Shapes and dtypes of ``tree`` placed with ``sharding`` (one for every leaf, or a tree of
  them like ``tree``, e.g. ``parallel.state_shardings``): the restore target."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding
  )


def reason_line(error: Exception) -> str:
  """One line of an Orbax / TensorStore error (their JSON specs left out)."""
  text = (str(error).strip().splitlines() or [''])[0].split(' [tensorstore_spec=')[0]
  text = text if len(text) <= 400 else f'{text[:180]} ... {text[-200:]}'  # What, and why.
  return f'{type(error).__name__}: {text}'


def _drop(unraisable) -> bool:
  return isinstance(unraisable.exc_value, RuntimeError) and 'Event loop is closed' in str(
    unraisable.exc_value
  )


def quiet_closed_loops() -> None:
  """After a failed restore, Orbax's TensorStore reads still under way find their event loop
  closed, and each prints a traceback (through ``sys.unraisablehook``) while the warning has said
  what failed; so do its writes after a failed save (a full disk), whose error is raised. Drops just those (from now on; they are never more than that noise)."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loops', False):
    return
  hook = lambda unraisable: None if _drop(unraisable) else previous(unraisable)
  hook.drops_closed_loops = True
  sys.unraisablehook = hook


def move_checkpoint_aside(directory: str, step: int) -> str:
  """Renames ``<step>`` to ``<step>.corrupt`` (``.corrupt.<n>`` when taken); on an object store a
  copy of every object, then a delete (``paths.move_tree``)."""
  names = set(paths.listdir(directory))
  target = f'{step}{CORRUPT_SUFFIX}'
  n = 1
  while target in names:
    target = f'{step}{CORRUPT_SUFFIX}.{n}'
    n += 1
  target = paths.join(directory, target)
  paths.move_tree(paths.join(directory, str(step)), target)
  return target


def restore_newest(
  workdir: str,
  config: ml_collections.ConfigDict,
  abstract_state: Any,
  move_aside: bool = False,
) -> tuple[Any, int]:
  """``(state, step)`` of the newest checkpoint of ``workdir`` that restores.

  A checkpoint that cannot be restored is reported in a warning (its path and the reason) and
  the one before it is tried. Once one restores, the newer ones that failed are moved aside to
  ``checkpoints/<step>.corrupt`` when ``move_aside`` (the trainer, which holds the lock; never
  deleted), so that new checkpoints can take their steps. Without ``move_aside`` (readers) the
  workdir is only read.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    CheckpointRestoreError: none restores (then nothing is moved); lists each with its reason.
  """
  directory = files.checkpoint_dir(workdir)
  quiet_closed_loops()
  failed = []
  for step in reversed(files.checkpoint_steps(workdir)):
    # A fresh manager each time: one that failed on a damaged checkpoint may fail on the rest.
    manager = make_manager(workdir, config, read_only=not move_aside)
    try:
      state = restore_checkpoint(manager, abstract_state, step)
    except Exception as e:  # noqa: BLE001  Damaged files, missing parts, other shapes: all.
      failed.append((step, reason_line(e)))
      logging.warning(
        'Cannot restore the checkpoint %s/%d (%s); trying the one before it.',
        directory,
        step,
        failed[-1][1],
      )
      continue
    finally:
      manager.close()
    if failed and move_aside:
      if jax.process_index() == 0:
        for bad, _ in failed:
          logging.warning(
            'Moved the checkpoint of step %d, which cannot be restored, to %s (kept for a '
            'look; delete it when done). Resuming from step %d.',
            bad,
            move_checkpoint_aside(directory, bad),
            step,
          )
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('mixer_vit: damaged checkpoints moved aside')
    return state, step
  if not failed:
    raise FileNotFoundError(f'no checkpoint in {directory}.')
  reasons = '; '.join(f'{directory}/{step}: {reason}' for step, reason in failed)
  raise CheckpointRestoreError(
    f'none of the checkpoints in {directory} can be restored ({reasons}). If the config '
    "changed what is trained since they were written, resume with the workdir's config.json. "
    'Otherwise the files are damaged: move them out of the way to start over (nothing was '
    'changed).'
  )
