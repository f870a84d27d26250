"""The config contract: what a relaunch may change, and the launch history (config_history.jsonl)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
from typing import Any

from absl import logging
import ml_collections

from mixer_vit.runtime import paths
from mixer_vit.training import config_utils
from mixer_vit.workdir import files
from mixer_vit.workdir.files import CHECKPOINT_DIR
from mixer_vit.workdir.files import CONFIG_FILE
from mixer_vit.workdir.files import HISTORY_FILE
from mixer_vit.workdir.files import METRICS_FILE
from mixer_vit.workdir.files import PARAMS_FILE
from mixer_vit.workdir.files import ConfigChangeError
from mixer_vit.workdir.files import WorkdirError

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
  steps_on_disk = files.checkpoint_steps(workdir)
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
