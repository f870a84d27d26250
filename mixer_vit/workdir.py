"""The workdir of a training run: every file in it is named, written and read here.

  WORKDIR/
    config.json            the resolved training config (of the latest launch)
    config_history.jsonl   one JSON object per launch: time, host, PID, step, changed keys
    dataset_info.json      class count and names, input image shape, split sizes
    checkpoints/<step>/    Orbax train-state checkpoints (parameters, optimiser state, step; the
                           EMA parameters when config.ema_decay is set)
    checkpoints/<step>.corrupt/  a checkpoint that could not be restored, moved aside (kept)
    metrics.jsonl          one JSON object per write: {"step": S, ...}
    events.out.tfevents.*  TensorBoard
    params.npz             the final parameters, in the released checkpoints' layout
    params_ema.npz         the final EMA parameters (config.ema_decay), in the same layout
    train.lock             held by the training run using the workdir: its host and PID (an
                           fcntl lock locally, a lease renewed every minute on gs:// and other URLs)
    .mixer_vit_workdir     the marker: written when the trainer creates (or claims an empty) folder;
                           JSON with a creation id, time, host and PID

WORKDIR may be a local path or a URL (``gs://bucket/run``, ``ram://run``): every file above except
the Orbax checkpoints is read and written through ``mixer_vit.paths``; Orbax gets the same URL.

Train-state checkpoints are written every ``checkpoint_every`` steps and at the end, the last
``keep_checkpoints`` kept, asynchronously while training goes on. Every process calls the
checkpoint functions; Orbax coordinates who writes what. ``load_workdir`` rebuilds the model and
its latest parameters (or, with ``ema=True``, their EMA) from a workdir, which is what the
command-line tools start from.

What a relaunch may rely on:
- Ownership: the trainer writes only in a folder it made (``.mixer_vit_workdir`` marks it), a new
  or empty one (then marked), or a workdir of this project written before the marker existed
  (``config.json`` of this project's config and checkpoints, a ``train.lock`` or a
  ``config_history.jsonl``: marked, with a log line). Any other non-empty folder is refused before
  anything is written (``check_ownership``), naming some of the files found.
- One writer: a training run holds ``train.lock`` (process i > 0 of a multi-process run
  ``train.lock.<i>``) from before its first write until it ends; a second run is refused with the
  holder's host and PID. The OS drops the lock when the process ends, however it ends. Readers
  (``load_workdir``, the tools) never take it. On a URL (an object store has no locks) the run
  holds a lease file instead (``LeaseLock``): refused while fresh, taken over once stale.
- The config contract: once a workdir has a ``config.json``, a config that differs in a key
  outside ``RESUMABLE_KEYS`` is refused before anything is written (``check_config_change``),
  unless ``allow_config_change=True``, whether or not checkpoints were written yet; every launch
  and its changes are appended to ``config_history.jsonl``. A finished run (``params.npz``, or
  metrics up to its ``total_steps``) whose checkpoints are gone is refused whatever the config:
  training again would replace its results.
- Fallback: a checkpoint that cannot be restored is reported and the one before it is used
  (``restore_newest``); the trainer moves the bad one aside, never deletes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any
import uuid

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mixer_vit import config_utils
from mixer_vit import data
from mixer_vit import optim
from mixer_vit import params_io
from mixer_vit import paths
from mixer_vit import steps

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

# Keys a resumed run may change: how long it runs, what it logs, evaluates and keeps, where and how
# fast it reads and multiplies; not the function it trains. (total_steps stretches or shortens the learning-rate
# schedule from the resumed step on; a warning says so.) Every other key is fixed once the workdir
# has a checkpoint, unless allow_config_change=True.
RESUMABLE_KEYS = frozenset(
  {
    'total_steps',
    'log_every',
    'eval_every',
    'checkpoint_every',
    'keep_checkpoints',
    'async_checkpoints',
    'allow_config_change',
    'eval_batch_size',
    'data_dir',
    'prefetch',
    'data_threads',
    'device_prefetch',
    'in_memory_max_mb',
    'max_image_pixels',
    'fewshot_every',
    'matmul_dtype',  # The same parameters and optimiser state, multiplied in another precision.
  }
)
# Evaluation-only groups of keys; and the device mesh (how the state lies, not what it is: a run
# resumes onto another mesh, the checkpoint restored with the new run's shardings).
RESUMABLE_PREFIXES = ('fewshot.', 'mesh.')


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
  paths.write_text(
    path, value if isinstance(value, str) else json.dumps(value, indent=2), path + '.tmp'
  )


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


# ---------------------------------------------------------------------------------------------
# The config contract: what a relaunch may change.

_ABSENT = '<absent>'


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'model': {'hidden_size': 64}} -> {'model.hidden_size': 64} (empty groups left out)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config_utils.to_json(config))


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (old, new)}`` for every value that differs between two JSON configs.

  A key one side lacks (a config written before the key existed) counts as its
  ``base_config()`` default, or as ``'<absent>'`` when it has none."""
  base = _flat(_plain(config_utils.base_config()))
  old, new = _flat(old), _flat(new)
  changes = {}
  for key in sorted(old.keys() | new.keys()):
    a, b = old.get(key, base.get(key, _ABSENT)), new.get(key, base.get(key, _ABSENT))
    if a != b:
      changes[key] = (a, b)
  return changes


def is_resumable_key(key: str) -> bool:
  return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_PREFIXES)


@dataclasses.dataclass
class Launch:
  """What ``check_config_change`` found in the workdir before a run wrote anything there."""

  has_config: bool  # The workdir holds a config.json (an earlier launch).
  checkpoints: list[int]  # Checkpoint steps on disk, oldest first.
  changes: dict[str, tuple[Any, Any]]  # Every key that differs from config.json: (old, new).
  forced: list[str]  # Changed keys outside RESUMABLE_KEYS, accepted by allow_config_change.


def _value_text(value: Any) -> str:
  return value if value is _ABSENT else json.dumps(value)


def check_config_change(workdir: str, config: ml_collections.ConfigDict) -> Launch:
  """Compares ``config`` with the run ``workdir`` holds; reads only, writes nothing.

  Raises:
    ConfigChangeError: ``config`` differs from the workdir's config.json (checkpoints or not) in
      a key outside ``RESUMABLE_KEYS`` while ``config.allow_config_change`` is False. The message
      lists each such key (old -> new) and the ways on.
    WorkdirError: the workdir holds a finished run (``params.npz``, or metrics up to its
      ``total_steps``) without checkpoints: a run would start over on top of its results.
  """
  path = paths.join(workdir, CONFIG_FILE)
  steps_on_disk = checkpoint_steps(workdir)
  if not paths.exists(path):
    return Launch(False, steps_on_disk, {}, [])
  try:
    previous = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise WorkdirError(
      f'cannot read {path} ({e}); it records how the run in {workdir} was trained. Restore it, '
      'or use another --workdir.'
    ) from None
  if not steps_on_disk:
    finished = _finished_results(workdir, previous)
    if finished:
      raise WorkdirError(
        f'{workdir} holds a finished run ({finished}) but no checkpoint ({CHECKPOINT_DIR}/ is '
        'missing or empty): training again would replace its results, so nothing was changed. '
        'Restore its checkpoints to resume it, or train in another --workdir.'
      )
  changes = config_changes(previous, _plain(config))
  fixed = [k for k in changes if not is_resumable_key(k)]
  if fixed and not config.get('allow_config_change', False):
    lines = '; '.join(
      f'{k}: {_value_text(changes[k][0])} -> {_value_text(changes[k][1])}' for k in fixed
    )
    accepted = [k for k in changes if k not in fixed]
    also = f' (These may change and would be accepted: {", ".join(accepted)}.)' if accepted else ''
    kept = f'checkpoints of steps {steps_on_disk}' if steps_on_disk else 'no checkpoint yet'
    raise ConfigChangeError(
      f'{workdir} holds a run trained with another config (its {CONFIG_FILE}; {kept}). '
      f'Resuming it with this config would change what is trained: {lines}. Nothing in '
      f'{workdir} was changed.{also} Either resume with the values above '
      '(drop the overrides or restore the config file), or start a new run with another '
      '--workdir, or accept the change on purpose with --config.allow_config_change=True (it '
      f'is recorded in {paths.join(workdir, HISTORY_FILE)}).'
    )
  return Launch(True, steps_on_disk, changes, fixed)


def _finished_results(workdir: str, previous: dict[str, Any]) -> str | None:
  """What shows that the run in ``workdir`` finished (for a workdir without checkpoints): its
  ``params.npz``, or an evaluation at its last step (a loss row alone may come from a run killed
  while writing its first checkpoint)."""
  if paths.exists(paths.join(workdir, PARAMS_FILE)):
    return PARAMS_FILE
  path = paths.join(workdir, METRICS_FILE)
  total = previous.get('total_steps')
  if not isinstance(total, int) or total < 1 or not paths.exists(path):
    return None
  last = 0
  for line in paths.read_text(path).splitlines():
    try:
      row = json.loads(line)
    except ValueError:  # A row cut short by a crash.
      continue
    evaluated = isinstance(row, dict) and any(str(k).startswith('test_') for k in row)
    if evaluated and isinstance(row.get('step'), int):
      last = max(last, row['step'])
  return f'{METRICS_FILE} with its evaluation at step {last} of {total}' if last >= total else None


def record_launch(workdir: str, launch: Launch, step: int) -> None:
  """Appends this launch (and the keys it changed) to ``config_history.jsonl``."""
  if not launch.has_config:
    event = 'start'
  else:
    event = 'resume' if step else 'restart'
  row = {
    'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'event': event,
    'step': int(step),
    'changes': {k: [a, b] for k, (a, b) in launch.changes.items()},
    'forced': launch.forced,
  }
  if 'total_steps' in launch.changes and step:
    logging.warning(
      'total_steps changed from %s to %s: the learning-rate schedule now spans %s steps, so '
      'the rates from step %d on differ from those of the original schedule.',
      *launch.changes['total_steps'],
      launch.changes['total_steps'][1],
      step,
    )
  for key in launch.forced:
    logging.warning(
      'config.%s changed from %s to %s (allow_config_change=True); recorded in %s.',
      key,
      _value_text(launch.changes[key][0]),
      _value_text(launch.changes[key][1]),
      HISTORY_FILE,
    )
  paths.append_text(paths.join(workdir, HISTORY_FILE), json.dumps(row) + '\n')


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The rows of ``config_history.jsonl`` (empty when there is none)."""
  path = paths.join(workdir, HISTORY_FILE)
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# One writer per workdir.


class WorkdirLock:
  """An exclusive ``fcntl.flock`` on ``WORKDIR/train.lock`` (``train.lock.<i>`` for process i > 0
  of a multi-process run, whose processes share the workdir), holding the holder's host and PID.

  The OS drops the lock when the process ends, however it ends: a leftover file blocks nothing.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    name = LOCK_FILE if process_index == 0 else f'{LOCK_FILE}.{process_index}'
    self.path = os.path.join(workdir, name)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirBusyError naming the holder (the file then unchanged)."""
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # Read-only, not ours, no space: nothing was written.
      raise WorkdirError(
        f'cannot write in --workdir={os.path.dirname(self.path)} ({e.strerror}: {e.filename}); '
        'give a folder you can write to.'
      ) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 4096).decode('utf-8', 'replace').strip()
      os.close(fd)
      try:
        h = json.loads(holder)
        who = f'PID {h["pid"]} on {h["host"]} (since {h["since"]})'
      except (ValueError, KeyError, TypeError):
        who = 'another process (it has not written its host and PID yet)'
      workdir = os.path.dirname(self.path)
      raise WorkdirBusyError(
        f'{workdir} is in use by another training run: {who} holds {self.path}. Wait for it to '
        'end or stop it, or use another --workdir. (Reading the workdir, e.g. with '
        'mixer_vit.infer or mixer_vit.evaluate, needs no lock.)'
      ) from None
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    holder = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': since})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder + '\n').encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# The lease of a workdir on an object store (LeaseLock): renewed every LEASE_RENEW_S by the run
# that holds it, stale (and then taken over by the next run) once LEASE_TIMEOUT_S old. After
# writing its lease a run waits LEASE_SETTLE_S and reads it back: a run that started at the same
# moment and wrote last wins, the other stops.
LEASE_TIMEOUT_S = 600.0
LEASE_RENEW_S = 60.0
LEASE_SETTLE_S = 2.0
_HELD_LEASES: set[str] = set()  # Tokens of the leases this process holds now.


def _pid_alive(pid: int) -> bool:
  """Whether process ``pid`` of this host runs (signal 0 only checks)."""
  if pid <= 0:  # Not a process (0 and -1 would address groups).
    return False
  try:
    os.kill(pid, 0)
  except (ProcessLookupError, OverflowError):
    return False
  except PermissionError:  # It runs, as another user.
    return True
  return True


class LeaseLock:
  """One writer on a workdir where ``fcntl`` cannot work (``gs://``, any URL): a lease file
  ``WORKDIR/train.lock`` (``train.lock.<i>`` for process i > 0) holding the holder's host, PID,
  start time and the time it was last renewed, rewritten every ``renew_s`` by a thread.

  A run refuses to start while the lease of another run is fresh (renewed less than
  ``timeout_s`` ago); it takes over a stale one (the holder died without removing it), with a
  warning naming it, and at once one left by a process of this host that no longer runs. The
  lease is advisory: two runs launched within the same second or two may both find no lease;
  each reads its lease back after ``settle_s`` and the one that wrote first stops, but an object
  store gives no compare-and-swap through ``tf.io.gfile``, so this narrows the window without
  closing it.
  """

  def __init__(
    self,
    workdir: str,
    process_index: int = 0,
    timeout_s: float | None = None,
    renew_s: float | None = None,
    settle_s: float | None = None,
  ):
    name = LOCK_FILE if process_index == 0 else f'{LOCK_FILE}.{process_index}'
    self.path = paths.join(workdir, name)
    self.timeout_s = LEASE_TIMEOUT_S if timeout_s is None else timeout_s
    self.renew_s = LEASE_RENEW_S if renew_s is None else renew_s
    self.settle_s = LEASE_SETTLE_S if settle_s is None else settle_s
    self.lost = False  # Set when another run overwrote the lease while this one held it.
    self._token = uuid.uuid4().hex
    self._since = ''
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def read(self) -> dict[str, Any] | None:
    """The lease in the file (None when there is none)."""
    if not paths.exists(self.path):
      return None
    text = paths.read_text(self.path)
    try:
      holder = json.loads(text)
      float(holder['renewed'])
      return holder
    except (ValueError, KeyError, TypeError):
      raise WorkdirBusyError(
        f'{self.path} is not a lease this project wrote ({text[:200]!r}); if no training run '
        f'uses {paths.dirname(self.path)}, delete it (gsutil rm {self.path}) and run again.'
      ) from None

  def _write(self) -> None:
    now = time.time()
    lease = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'since': self._since,
      'renewed': now,
      'renewed_at': datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(
        timespec='seconds'
      ),
      'timeout_s': self.timeout_s,
      'token': self._token,
    }
    paths.write_text(self.path, json.dumps(lease) + '\n')

  def _who(self, holder: dict[str, Any]) -> str:
    return (
      f'PID {holder.get("pid")} on {holder.get("host")} (since {holder.get("since")}, last '
      f'renewed {holder.get("renewed_at")})'
    )

  def acquire(self) -> None:
    """Takes the lease, or raises WorkdirBusyError naming the holder and the file (unchanged)."""
    paths.makedirs(paths.dirname(self.path))
    holder = self.read()
    if holder is not None:
      age = time.time() - float(holder['renewed'])
      here = holder.get('host') == socket.gethostname()
      pid = int(holder.get('pid', -1))
      if here and pid == os.getpid():
        gone = holder.get('token') not in _HELD_LEASES  # Left by an earlier run of this process.
      else:
        gone = here and not _pid_alive(pid)
      if age < self.timeout_s and not gone:
        workdir = paths.dirname(self.path)
        raise WorkdirBusyError(
          f'{workdir} is in use by another training run: {self._who(holder)} holds the lease '
          f'{self.path} ({age:.0f} s ago). Wait for it to end or stop it, or use another '
          f'--workdir. A lease not renewed for {self.timeout_s:.0f} s is stale and the next run '
          f'takes it over; if you are sure no run uses the workdir, delete it now (gsutil rm '
          f'{self.path}). (Reading the workdir, e.g. with mixer_vit.infer, needs no lease.)'
        )
      logging.warning(
        'Taking over the lease %s of %s: %s.',
        self.path,
        self._who(holder),
        'that process no longer runs'
        if gone
        else f'not renewed for {age:.0f} s, longer than the {self.timeout_s:.0f} s after which '
        'a lease is stale',
      )
    self._since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    self._write()
    if self.settle_s:
      time.sleep(self.settle_s)
    holder = self.read()
    if holder is None or holder.get('token') != self._token:
      raise WorkdirBusyError(
        f'{paths.dirname(self.path)} is in use by another training run: it wrote the lease '
        f'{self.path} at the same time as this one'
        + (f' ({self._who(holder)})' if holder else '')
        + '. Use another --workdir, or wait for that run to end.'
      )
    _HELD_LEASES.add(self._token)
    self._stop.clear()
    self._thread = threading.Thread(target=self._renew, name='mixer_vit-lease', daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.renew_s):
      try:
        holder = self.read()
        if holder is None or holder.get('token') != self._token:
          self.lost = True
          logging.error(
            'The lease %s of this run was %s: another run may now write to the same workdir. '
            'Stop one of them.',
            self.path,
            f'taken by {self._who(holder)}' if holder else 'deleted',
          )
          return
        self._write()
      except Exception as e:  # noqa: BLE001  A failed renewal is retried; training goes on.
        logging.warning('Could not renew the lease %s (%s); trying again.', self.path, e)

  def release(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    _HELD_LEASES.discard(self._token)
    try:
      holder = self.read()
      if holder is not None and holder.get('token') == self._token:
        paths.remove(self.path)
    except Exception as e:  # noqa: BLE001  It goes stale by itself.
      logging.warning('Could not remove the lease %s (%s); it goes stale by itself.', self.path, e)

  def __enter__(self) -> LeaseLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def make_lock(workdir: str, process_index: int = 0) -> WorkdirLock | LeaseLock:
  """The lock of ``workdir`` for process ``process_index``: an ``fcntl`` lock for a local path,
  a lease file for a URL (object stores have no locks)."""
  if paths.is_remote(workdir):
    return LeaseLock(workdir, process_index)
  return WorkdirLock(workdir, process_index)


def lock_workdir(workdir: str) -> WorkdirLock | LeaseLock:
  """This process's lock (``make_lock``), taken; with several processes, every process of the run
  stops (with the holder's name) when any of them finds its lock taken."""
  lock = make_lock(workdir, jax.process_index())
  error = None
  try:
    lock.acquire()
  except WorkdirBusyError as e:
    error = e
  if jax.process_count() > 1:
    taken = multihost_utils.process_allgather(np.int32(error is None))
    if error is None and not np.all(taken):
      lock.release()
      error = WorkdirBusyError(
        f'{workdir} is in use by another training run (process(es) '
        f'{np.flatnonzero(np.asarray(taken) == 0).tolist()} of this run found their lock files '
        'taken; see their messages).'
      )
  if error is not None:
    raise error
  return lock


# ---------------------------------------------------------------------------------------------
# Orbax train-state checkpoints.


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
    checkpoint_dir(workdir), options=options, item_handlers=ocp.StandardCheckpointHandler()
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


def _reason(error: Exception) -> str:
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


def _move_aside(directory: str, step: int) -> str:
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
  directory = checkpoint_dir(workdir)
  quiet_closed_loops()
  failed = []
  for step in reversed(checkpoint_steps(workdir)):
    # A fresh manager each time: one that failed on a damaged checkpoint may fail on the rest.
    manager = make_manager(workdir, config, read_only=not move_aside)
    try:
      state = restore_checkpoint(manager, abstract_state, step)
    except Exception as e:  # noqa: BLE001  Damaged files, missing parts, other shapes: all.
      failed.append((step, _reason(e)))
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
            _move_aside(directory, bad),
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


# ---------------------------------------------------------------------------------------------
# Reading a run back.


@dataclasses.dataclass
class TrainedModel:
  """What ``load_workdir`` returns: enough to run the model on new images."""

  config: ml_collections.ConfigDict  # The training config (data keys give the preprocessing).
  model_config: ml_collections.ConfigDict
  model: Any  # flax module: model.apply({'params': params}, images, train=False).
  params: Any  # Host (numpy) arrays: the parameters, or their EMA (`ema`).
  class_names: list[str] | None
  image_shape: tuple[int, ...]  # (H, W, 3) the model was trained on.
  step: int
  ema: bool = False  # `params` are the EMA parameters of the checkpoint.


def load_workdir(workdir: str, step: int | None = None, ema: bool = False) -> TrainedModel:
  """The model, config and parameters of the latest (or the given) checkpoint in ``workdir``.

  Works while the training still runs (reads the newest finished checkpoint) and on any device
  count; the parameters come back as numpy arrays. With ``ema`` they are the checkpoint's EMA
  parameters (``config.ema_decay``); a WorkdirError says so when it has none.
  """
  config = read_config(workdir)
  info = read_dataset_info(workdir)
  image_shape = tuple(info['image_shape'])
  model_config, model = steps.make_model(config, info['num_classes'], image_shape[:2])
  tx = optim.make_optimizer(config)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  init = steps.make_init_fn(model, tx, image_shape)
  abstract = abstract_like(jax.eval_shape(init, jax.random.PRNGKey(0)), sharding)
  if step is None:  # The newest that restores (a damaged one is reported and left as it is).
    state, step = restore_newest(workdir, config, abstract)
  else:
    if step not in checkpoint_steps(workdir):
      raise FileNotFoundError(
        f'no checkpoint of step {step} in {checkpoint_dir(workdir)} (steps: '
        f'{checkpoint_steps(workdir)}).'
      )
    manager = make_manager(workdir, config, read_only=True)
    try:
      state = restore_checkpoint(manager, abstract, step)
    except Exception as e:  # noqa: BLE001  Whatever is damaged: one message naming the files.
      raise CheckpointRestoreError(
        f'cannot restore {paths.join(checkpoint_dir(workdir), str(step))} ({_reason(e)}).'
      ) from e
    finally:
      manager.close()
  params = state.params
  if ema:
    params = steps.ema_params_of(state)
    if params is None:
      raise WorkdirError(
        f'{workdir}/{CHECKPOINT_DIR}/{step} holds no EMA parameters: the run was trained '
        'without config.ema_decay (train with --config.ema_decay=D to have them); leave out '
        '--ema to use its parameters.'
      )
  return TrainedModel(
    config=config,
    model_config=model_config,
    model=model,
    params=jax.device_get(params),
    class_names=info['class_names'],
    image_shape=image_shape,
    step=step,
    ema=ema,
  )
