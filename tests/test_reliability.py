"""A workdir that no crash, relaunch or second run can damage.

In-process: the config contract (refused / accepted / forced changes, workdir unchanged when
refused), one writer per workdir, the fallback from a damaged checkpoint, metrics that tell the
truth after a resume, clear errors for a damaged .npz. Through the command line: kill -9 at
several moments (one during a checkpoint write), resumed each time, gives the parameters of an
uninterrupted run bit for bit and one metrics row per step; a SIGTERM after the last step exits 0;
the process exits promptly after its last line.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2
import tensorflow as tf
from test_train import compilation_cache_for_repeated_runs  # noqa: F401  (autouse fixture)
from test_train import flat
from test_train import tiny_config

from mixer_vit import data
from mixer_vit import workdir as workdir_lib
from mixer_vit.models import params_io
from mixer_vit.training import config_utils
from mixer_vit.training import metrics
from mixer_vit.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def snapshot(root) -> dict[str, bytes | None]:
  """Every file (bytes) and folder (None) under ``root``."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(folder, name), root)] = None
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def rows(workdir):
  return metrics.read_jsonl(os.path.join(workdir, workdir_lib.METRICS_FILE))


def values(workdir):
  """The rows without their timing."""
  return [{k: v for k, v in r.items() if k != 'img_per_s'} for r in rows(workdir)]


def assert_one_row_per_step(workdir, total, eval_steps):
  got = rows(workdir)
  assert [r['step'] for r in got if 'loss' in r] == list(range(1, total + 1))
  assert [r['step'] for r in got if 'test_accuracy' in r] == list(eval_steps)


def tensorboard_points(workdir) -> dict[str, list[int]]:
  """tag -> the steps of its values, over every event file of the workdir."""
  points = {}
  for name in sorted(os.listdir(workdir)):
    if 'tfevents' in name:
      for record in tf.data.TFRecordDataset(os.path.join(workdir, name)).as_numpy_iterator():
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
          points.setdefault(value.tag, []).append(event.step)
  return points


def assert_same_params(a_workdir, b_workdir):
  a = flat(params_io.load_npz(os.path.join(a_workdir, workdir_lib.PARAMS_FILE)))
  b = flat(params_io.load_npz(os.path.join(b_workdir, workdir_lib.PARAMS_FILE)))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


TOTAL = 40


def run_config():
  """The tiny config of tests/test_train.py: 40 steps, checkpoints every 10 (the last 2 kept)."""
  return tiny_config(total_steps=TOTAL, checkpoint_every=10, eval_every=TOTAL)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """One uninterrupted run (in this process), the reference of every test here; tests copy its
  workdir before changing it. Its compilations are cached for the command-line runs too."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  config = run_config()
  train.train_and_evaluate(config, workdir)
  assert workdir_lib.checkpoint_steps(workdir) == [30, 40]
  return config, workdir


def copy_of(run, tmp_path):
  config, workdir = run
  target = str(tmp_path / 'run')
  shutil.copytree(workdir, target)
  return config.copy_and_resolve_references(), target


# ---------------------------------------------------------------------------------------------
# The config contract.


def test_a_config_that_changes_what_is_trained_is_refused_and_nothing_is_written(
  finished_run, tmp_path, monkeypatch
):
  config, workdir = copy_of(finished_run, tmp_path)
  before = snapshot(workdir)
  config.lr = 0.02
  config.model.hidden_size = 16
  config.total_steps = 60  # May change: listed as accepted, not as a reason.
  with pytest.raises(workdir_lib.ConfigChangeError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert 'lr: 0.01 -> 0.02' in message and 'model.hidden_size: 32 -> 16' in message
  assert 'allow_config_change=True' in message and '--workdir' in message
  assert 'total_steps:' not in message and 'total_steps' in message
  assert snapshot(workdir) == before  # Not even the lock file was touched.

  # Errors found from the config alone come before the data set is read or anything written.
  monkeypatch.setattr(data, 'get_info', lambda _: pytest.fail('the data set was read'))
  config = tiny_config(model_name='ViT-Nope_16')
  with pytest.raises(ValueError, match='Unknown model'):
    train.train_and_evaluate(config, workdir)
  new = tmp_path / 'new'
  with pytest.raises(ValueError, match='Unknown model'):
    train.train_and_evaluate(config, str(new))
  with pytest.raises(ValueError, match="config.pp_train: unknown preprocessing op 'decod'"):
    train.train_and_evaluate(tiny_config(pp_train='decod|onehot'), str(new))
  assert snapshot(workdir) == before and not new.exists()


def test_accepted_and_forced_changes_are_recorded(finished_run, tmp_path):
  config, workdir = copy_of(finished_run, tmp_path)
  config.total_steps, config.log_every = 44, 2  # Keys that may change.
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 44
  assert [r['step'] for r in rows(workdir) if 'loss' in r] == [*range(1, 41), 42, 44]
  config.update(lr=0.02, allow_config_change=True)
  train.train_and_evaluate(config, workdir)  # Finished: evaluates only.

  history = workdir_lib.read_history(workdir)
  assert [(h['event'], h['step']) for h in history] == [
    ('start', 0),
    ('resume', 40),
    ('resume', 44),
  ]
  assert history[1]['changes'] == {'total_steps': [40, 44], 'log_every': [1, 2]}
  assert history[1]['forced'] == []
  assert history[2]['changes'] == {'lr': [0.01, 0.02], 'allow_config_change': [False, True]}
  assert history[2]['forced'] == ['lr'] and history[2]['pid'] == os.getpid()
  assert workdir_lib.read_config(workdir).lr == 0.02  # config.json: the latest launch.


# ---------------------------------------------------------------------------------------------
# One writer per workdir.


def test_a_second_run_is_refused_while_the_workdir_is_in_use(finished_run, tmp_path):
  config, workdir = copy_of(finished_run, tmp_path)
  with workdir_lib.WorkdirLock(workdir):  # Another run holds it (flock: per open file).
    before = snapshot(workdir)
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f'PID {os.getpid()} on '):
      train.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before
    assert workdir_lib.load_workdir(workdir).step == TOTAL  # Readers need no lock.

  # The OS drops the lock of a process that dies, however it dies: no stale lock.
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import fcntl, os, sys, time\n'
      f'fd = os.open({os.path.join(workdir, workdir_lib.LOCK_FILE)!r}, os.O_RDWR)\n'
      'fcntl.flock(fd, fcntl.LOCK_EX)\nprint("held", flush=True)\ntime.sleep(120)',
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(workdir_lib.WorkdirBusyError):
      workdir_lib.WorkdirLock(workdir).acquire()
  finally:
    holder.kill()
    holder.wait()
  assert train.train_and_evaluate(config, workdir)['step'] == TOTAL  # (Evaluates only.)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints, metrics after a resume.


def _truncate_data(step_dir):
  for folder, _, files in os.walk(step_dir):
    for name in files:
      if os.path.basename(folder) == 'd':  # TensorStore's data files.
        path = os.path.join(folder, name)
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
  'truncated data': _truncate_data,
  'missing item folder': lambda step_dir: shutil.rmtree(os.path.join(step_dir, 'default')),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_resumed(
  damage, finished_run, tmp_path
):
  config, workdir = copy_of(finished_run, tmp_path)
  reference = finished_run[1]
  checkpoints = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  DAMAGE[damage](os.path.join(checkpoints, '40'))
  before = snapshot(workdir)
  assert workdir_lib.load_workdir(workdir).step == 30  # Readers fall back too, moving nothing.
  assert snapshot(workdir) == before

  result = train.train_and_evaluate(config, workdir)  # Resumes from 30, retrains 31-40.
  assert result['step'] == TOTAL
  assert sorted(os.listdir(checkpoints)) == ['30', '40', f'40{workdir_lib.CORRUPT_SUFFIX}']
  assert_same_params(workdir, reference)  # Bit for bit.
  assert_one_row_per_step(workdir, TOTAL, eval_steps=[TOTAL])
  assert values(workdir) == values(reference)  # As in the uninterrupted run, bit for bit.
  points = tensorboard_points(workdir)
  assert points['loss'] == list(range(1, TOTAL + 1)) and points['test_accuracy'] == [TOTAL]

  train.train_and_evaluate(config, workdir)  # Finished: evaluates again, still one row.
  assert_one_row_per_step(workdir, TOTAL, eval_steps=[TOTAL])
  assert tensorboard_points(workdir)['test_accuracy'] == [TOTAL]


def test_when_no_checkpoint_restores_the_error_names_each_and_nothing_moves(finished_run, tmp_path):
  config, workdir = copy_of(finished_run, tmp_path)
  checkpoints = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  for step in ('30', '40'):
    _truncate_data(os.path.join(checkpoints, step))
  before = snapshot(workdir)
  with pytest.raises(workdir_lib.CheckpointRestoreError, match='none of the checkpoints') as e:
    workdir_lib.load_workdir(workdir)
  assert f'{checkpoints}/40: ValueError' in str(e.value) and f'{checkpoints}/30: ' in str(e.value)
  config.total_steps = 60
  with pytest.raises(workdir_lib.CheckpointRestoreError):
    train.train_and_evaluate(config, workdir)
  before.pop(workdir_lib.LOCK_FILE)
  after = snapshot(workdir)
  after.pop(workdir_lib.LOCK_FILE)
  assert after == before


def test_a_damaged_npz_is_a_value_error_naming_it(tmp_path):
  path = tmp_path / 'params.npz'
  params_io.save_npz({'a': {'kernel': np.ones((64, 64), np.float32)}}, path)
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ValueError, match=f'{path} is not a readable .npz'):
    params_io.load_npz(path)


# ---------------------------------------------------------------------------------------------
# The command line: kill -9, SIGTERM, prompt exit.


def cli_overrides(config) -> list[str]:
  """``--config.KEY=VALUE`` for every key where ``config`` differs from configs/digits.py:vit."""
  digits = config_utils.load_config(f'{REPO}/configs/digits.py:vit')
  changes = workdir_lib.config_changes(
    json.loads(config_utils.to_json(digits)), json.loads(config_utils.to_json(config))
  )
  return [f'--config.{key}={new}' for key, (_, new) in changes.items()]


class Launch:
  """``python -m mixer_vit.main`` with its output lines read as they come (with their times)."""

  def __init__(self, workdir):
    args = cli_overrides(run_config())
    env = dict(
      os.environ,
      PYTHONPATH=str(REPO),
      # The compilations of the in-process runs, looked up instead of repeated.
      JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    )
    self.process = subprocess.Popen(
      [
        sys.executable,
        '-m',
        'mixer_vit.main',
        '--config=configs/digits.py:vit',
        f'--workdir={workdir}',
      ]
      + args,
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    self.lines: list[tuple[float, str]] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.append((time.monotonic(), line))

  def output(self) -> str:
    return ''.join(line for _, line in self.lines)

  def last_step(self) -> int:
    for _, line in reversed(self.lines):
      if f'/{TOTAL}  loss' in line:
        return int(line.split('step ')[1].split('/')[0])
    return 0

  def wait_until(self, condition, timeout=240, poll=0.005):
    deadline = time.monotonic() + timeout
    while not condition():
      assert self.process.poll() is None, self.output()[-3000:]
      assert time.monotonic() < deadline, self.output()[-3000:]
      time.sleep(poll)

  def finish(self, timeout=240) -> tuple[int, float]:
    """Exit status, and seconds from the last output line to the end of the process."""
    self.process.wait(timeout=timeout)
    ended = time.monotonic()
    self._reader.join(timeout=10)
    return self.process.returncode, ended - self.lines[-1][0]


def _writing(checkpoints, step='') -> list[str]:
  """Checkpoints being written (Orbax's temporary folders ``<step>.orbax-checkpoint-tmp-*``)."""
  if not os.path.isdir(checkpoints):
    return []
  return [n for n in os.listdir(checkpoints) if n.startswith(f'{step}') and 'tmp' in n]


@pytest.mark.slow  # Three launches of the command: about 45 s on 2 cores.
def test_kill_9_at_any_moment_then_resuming_equals_an_uninterrupted_run(finished_run, tmp_path):
  reference = finished_run[1]
  workdir = str(tmp_path / 'run')
  checkpoints = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  # 1. Killed while the checkpoint of step 20 is being written (10 is complete).
  run = Launch(workdir)
  run.wait_until(lambda: _writing(checkpoints, '20.'))
  run.process.kill()
  run.finish()
  assert _writing(checkpoints, '20.'), 'the kill came after the write'
  assert workdir_lib.read_config(workdir) == workdir_lib.read_config(reference)  # Same run.
  # 2. Killed a few steps after a checkpoint: metrics.jsonl then holds rows it has no state for.
  run = Launch(workdir)
  run.wait_until(lambda: 20 in workdir_lib.checkpoint_steps(workdir) and run.last_step() >= 21)
  run.process.kill()
  run.finish()
  assert 'Resumed from the checkpoint of step 10' in run.output()
  resumed_at = max(workdir_lib.checkpoint_steps(workdir))
  assert resumed_at >= 20 and resumed_at < max(r['step'] for r in rows(workdir))
  # 3. Runs to the end; a SIGTERM after the last step and the final checkpoint changes nothing.
  run = Launch(workdir)
  run.wait_until(lambda: 'Steps ' in run.output() and ' took ' in run.output())
  run.process.send_signal(signal.SIGTERM)
  status, lag = run.finish()
  assert status == 0, run.output()[-3000:]
  assert f'Resumed from the checkpoint of step {resumed_at}' in run.output()
  assert 'Stopped after step' not in run.output()
  assert lag < 2, f'the process lingered {lag:.1f} s after its last line'

  assert_same_params(workdir, reference)  # Bit for bit.
  assert_one_row_per_step(workdir, TOTAL, eval_steps=[TOTAL])
  assert values(workdir) == values(reference)
  assert tensorboard_points(workdir)['loss'] == list(range(1, TOTAL + 1))
  assert not _writing(checkpoints)  # The cut-short write was cleaned up.
  events = [h['event'] for h in workdir_lib.read_history(workdir)]
  assert events == ['start', 'resume', 'resume']
