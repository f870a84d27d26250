"""The workdir's files: their names, the errors, ownership (the marker), the run files and the final parameters."""

from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any
import uuid

from absl import logging
import ml_collections

from mixer_vit import data
from mixer_vit.models import params_io
from mixer_vit.runtime import paths
from mixer_vit.training import config_utils

CONFIG_FILE = 'config.json'
DATASET_INFO_FILE = 'dataset_info.json'
CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
PARAMS_FILE = 'params.npz'
PARAMS_EMA_FILE = 'params_ema.npz'
HISTORY_FILE = 'config_history.jsonl'
LOCK_FILE = 'train.lock'
MARKER_FILE = '.mixer_vit_workdir'
CORRUPT_SUFFIX = '.corrupt'


class WorkdirError(ValueError):
  """The workdir cannot be used as asked; the message names the file and what to do."""


class ConfigChangeError(WorkdirError):
  """A relaunch would train something else than the checkpoints in the workdir hold."""


class WorkdirBusyError(WorkdirError):
  """Another training run holds the workdir."""


class CheckpointRestoreError(WorkdirError):
  """No checkpoint of the workdir can be restored."""


# ---------------------------------------------------------------------------------------------
# Ownership: the trainer writes only in folders it made.

NEW, OURS, ADOPT = 'new', 'ours', 'adopt'
# Keys every config.json of this project has (config_utils.base_config), old ones included.
_CONFIG_KEYS = ('dataset', 'model_name', 'total_steps', 'pp_train', 'batch_size')


def _is_lock_name(name: str) -> bool:
  """A lock file, or the marker's temporary file (a run that stopped while marking)."""
  return name in (LOCK_FILE, MARKER_FILE + '.tmp') or name.startswith(LOCK_FILE + '.')


def _project_config(path: str) -> bool:
  """Whether ``path`` holds a config.json of this project."""
  try:
    value = json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return False
  return isinstance(value, dict) and all(k in value for k in _CONFIG_KEYS)


def check_ownership(workdir: str) -> str:
  """Whether the trainer may write in ``workdir``; reads only.

  Returns:
    ``NEW``: missing or empty (a lock file of a run that ended before marking it counts as
    empty): the run creates and marks it. ``OURS``: it holds ``MARKER_FILE``. ``ADOPT``: a
    workdir of this project written before the marker existed (its ``config.json`` parses as this
    project's config, and it has checkpoints, a lock file or ``config_history.jsonl``).

  Raises:
    WorkdirError: ``workdir`` is empty, a file, or a non-empty folder of other files (the
      message names some of them).
  """
  if not str(workdir).strip():
    raise WorkdirError(
      '--workdir is empty: give the folder of the run, e.g. --workdir=workdirs/digits (a new or '
      'empty folder, or the workdir of an earlier run to resume it).'
    )
  if not paths.exists(workdir):
    return NEW
  if not paths.isdir(workdir):
    raise WorkdirError(
      f'--workdir={workdir} is a file, not a folder; nothing was written. Give a new or empty '
      'folder (or the workdir of an earlier run to resume it).'
    )
  names = sorted(paths.listdir(workdir))
  if MARKER_FILE in names:
    return OURS
  if all(_is_lock_name(n) for n in names):
    return NEW
  adoptable = _project_config(paths.join(workdir, CONFIG_FILE)) and (
    bool(checkpoint_steps(workdir)) or HISTORY_FILE in names or any(map(_is_lock_name, names))
  )
  if adoptable:
    return ADOPT
  shown = ', '.join(names[:4]) + (f' and {len(names) - 4} more' if len(names) > 4 else '')
  raise WorkdirError(
    f'{workdir} is not empty and is not a workdir of this project (it holds {shown}; no '
    f'{MARKER_FILE}); nothing was written there. Give another --workdir: a new or empty folder.'
  )


def mark_workdir(workdir: str, ownership: str) -> None:
  """Writes ``MARKER_FILE`` into a ``NEW`` or ``ADOPT`` workdir (``check_ownership``); after
  the lock is taken, by process 0."""
  if ownership == OURS:
    return
  write_json(
    paths.join(workdir, MARKER_FILE),
    {
      'id': uuid.uuid4().hex,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'adopted': ownership == ADOPT,
    },
  )
  if ownership == ADOPT:
    logging.warning(
      'Adopted %s, a workdir of this project written before workdirs were marked: wrote %s.',
      workdir,
      MARKER_FILE,
    )


def is_workdir(path: str) -> bool:
  """True for a training workdir (it holds config.json)."""
  return paths.isdir(path) and paths.exists(paths.join(path, CONFIG_FILE))


def write_json(path: str, value: Any) -> None:
  """Writes ``value`` (JSON text or a JSON-able value) atomically: locally a temporary file,
  renamed; on an object store one object write (``paths.write_bytes``)."""
  paths.write_text(path, value if isinstance(value, str) else json.dumps(value, indent=2))


def write_run_files(
  workdir: str,
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  image_shape: tuple[int, ...],
) -> None:
  """``config.json`` and ``dataset_info.json``: what another tool needs to rebuild the model."""
  write_json(paths.join(workdir, CONFIG_FILE), config_utils.to_json(config))
  class_names = list(info.class_names) if info.class_names is not None else None
  write_json(
    paths.join(workdir, DATASET_INFO_FILE),
    {
      'num_classes': info.num_classes,
      'class_names': class_names,
      'image_shape': list(image_shape),
      'num_examples': dict(info.num_examples),
    },
  )


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config a run wrote to ``workdir``."""
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(
      f'{path} not found: {workdir} is not a training workdir (run '
      'python -m mixer_vit.main --workdir=... first).'
    )
  return config_utils.from_json(paths.read_text(path))


def read_dataset_info(workdir: str) -> dict[str, Any]:
  """``dataset_info.json``: num_classes, class_names, image_shape, num_examples."""
  return json.loads(paths.read_text(paths.join(workdir, DATASET_INFO_FILE)))


def save_params(workdir: str, params: Any, ema_params: Any = None) -> str:
  """Writes the final parameters to ``params.npz`` and their EMA, if any, to ``params_ema.npz``
  (one left by an earlier config of the run is removed when there is none); returns the path of
  ``params.npz``."""
  path = paths.join(workdir, PARAMS_FILE)
  params_io.save_npz(params, path)
  ema_path = paths.join(workdir, PARAMS_EMA_FILE)
  if ema_params is not None:
    params_io.save_npz(ema_params, ema_path)
  elif paths.exists(ema_path):
    paths.remove(ema_path)
    logging.warning('Removed %s: this run has no EMA any more (config.ema_decay).', ema_path)
  return path


def ema_npz_path(path: str) -> str:
  """The EMA file belonging to a parameter file: ``params_ema.npz`` beside a workdir's
  ``params.npz`` (or that file itself).

  Raises:
    FileNotFoundError: there is none (the run had no EMA, or has not finished); names the file.
    ValueError: ``path`` is another file; then give the EMA file itself.
  """
  name = os.path.basename(path)
  if name == PARAMS_EMA_FILE:
    return path
  if name != PARAMS_FILE:
    raise ValueError(
      f'--ema picks the EMA parameters of a training run: give its workdir, its {PARAMS_FILE} or '
      f'{PARAMS_EMA_FILE}, not {path} (for another file of averaged parameters, pass that file '
      'without --ema).'
    )
  ema_path = paths.join(paths.dirname(path), PARAMS_EMA_FILE)
  if not paths.exists(ema_path):
    raise FileNotFoundError(
      f'{ema_path} not found: the run that wrote {path} kept no EMA of its parameters (train '
      'with --config.ema_decay=D to have one), or it has not finished.'
    )
  return ema_path


def checkpoint_dir(workdir: str) -> str:
  """``WORKDIR/checkpoints``, the folder Orbax is given: absolute for a local workdir, the URL
  itself for ``gs://...`` (as given: no ``os.path.abspath``, no ``pathlib``, which would turn
  ``gs://`` into ``gs:/``)."""
  return paths.join(paths.absolute(workdir), CHECKPOINT_DIR)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints in ``workdir`` (``checkpoints/<step>/``), oldest first."""
  path = checkpoint_dir(workdir)
  if not paths.isdir(path):
    return []
  return sorted(
    int(n) for n in paths.listdir(path) if n.isdigit() and paths.isdir(paths.join(path, n))
  )
