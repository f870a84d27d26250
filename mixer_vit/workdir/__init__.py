"""The workdir of a training run: every file in it is named, written and read in this package.

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
the Orbax checkpoints is read and written through ``mixer_vit.runtime.paths``; Orbax gets the same URL.

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

from mixer_vit.workdir.checkpoints import abstract_like
from mixer_vit.workdir.checkpoints import has_ema
from mixer_vit.workdir.checkpoints import make_manager
from mixer_vit.workdir.checkpoints import quiet_closed_loops
from mixer_vit.workdir.checkpoints import restore_checkpoint
from mixer_vit.workdir.checkpoints import restore_newest
from mixer_vit.workdir.checkpoints import save_checkpoint
from mixer_vit.workdir.contract import RESUMABLE_KEYS
from mixer_vit.workdir.contract import RESUMABLE_PREFIXES
from mixer_vit.workdir.contract import Launch
from mixer_vit.workdir.contract import check_config_change
from mixer_vit.workdir.contract import config_changes
from mixer_vit.workdir.contract import is_resumable_key
from mixer_vit.workdir.contract import read_history
from mixer_vit.workdir.contract import record_launch
from mixer_vit.workdir.files import ADOPT
from mixer_vit.workdir.files import CHECKPOINT_DIR
from mixer_vit.workdir.files import CONFIG_FILE
from mixer_vit.workdir.files import CORRUPT_SUFFIX
from mixer_vit.workdir.files import DATASET_INFO_FILE
from mixer_vit.workdir.files import HISTORY_FILE
from mixer_vit.workdir.files import LOCK_FILE
from mixer_vit.workdir.files import MARKER_FILE
from mixer_vit.workdir.files import METRICS_FILE
from mixer_vit.workdir.files import NEW
from mixer_vit.workdir.files import OURS
from mixer_vit.workdir.files import PARAMS_EMA_FILE
from mixer_vit.workdir.files import PARAMS_FILE
from mixer_vit.workdir.files import CheckpointRestoreError
from mixer_vit.workdir.files import ConfigChangeError
from mixer_vit.workdir.files import WorkdirBusyError
from mixer_vit.workdir.files import WorkdirError
from mixer_vit.workdir.files import check_ownership
from mixer_vit.workdir.files import checkpoint_dir
from mixer_vit.workdir.files import checkpoint_steps
from mixer_vit.workdir.files import ema_npz_path
from mixer_vit.workdir.files import is_workdir
from mixer_vit.workdir.files import mark_workdir
from mixer_vit.workdir.files import read_config
from mixer_vit.workdir.files import read_dataset_info
from mixer_vit.workdir.files import save_params
from mixer_vit.workdir.files import write_json
from mixer_vit.workdir.files import write_run_files
from mixer_vit.workdir.loading import TrainedModel
from mixer_vit.workdir.loading import load_workdir
from mixer_vit.workdir.locks import LEASE_RENEW_S
from mixer_vit.workdir.locks import LEASE_SETTLE_S
from mixer_vit.workdir.locks import LEASE_TIMEOUT_S
from mixer_vit.workdir.locks import LeaseLock
from mixer_vit.workdir.locks import WorkdirLock
from mixer_vit.workdir.locks import lock_workdir
from mixer_vit.workdir.locks import make_lock

__all__ = [
  'ADOPT',
  'NEW',
  'OURS',
  'abstract_like',
  'has_ema',
  'make_manager',
  'quiet_closed_loops',
  'restore_checkpoint',
  'restore_newest',
  'save_checkpoint',
  'RESUMABLE_KEYS',
  'RESUMABLE_PREFIXES',
  'Launch',
  'check_config_change',
  'config_changes',
  'is_resumable_key',
  'read_history',
  'record_launch',
  'CHECKPOINT_DIR',
  'CONFIG_FILE',
  'CORRUPT_SUFFIX',
  'DATASET_INFO_FILE',
  'HISTORY_FILE',
  'LOCK_FILE',
  'MARKER_FILE',
  'METRICS_FILE',
  'PARAMS_EMA_FILE',
  'PARAMS_FILE',
  'CheckpointRestoreError',
  'ConfigChangeError',
  'WorkdirBusyError',
  'WorkdirError',
  'check_ownership',
  'checkpoint_dir',
  'checkpoint_steps',
  'ema_npz_path',
  'is_workdir',
  'mark_workdir',
  'read_config',
  'read_dataset_info',
  'save_params',
  'write_json',
  'write_run_files',
  'TrainedModel',
  'load_workdir',
  'LEASE_RENEW_S',
  'LEASE_SETTLE_S',
  'LEASE_TIMEOUT_S',
  'LeaseLock',
  'WorkdirLock',
  'lock_workdir',
  'make_lock',
]
