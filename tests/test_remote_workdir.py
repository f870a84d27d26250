"""Workdirs on URLs (``gs://`` in production), tested on TensorFlow's in-memory ``ram://`` store.

Every workdir file but the Orbax checkpoints goes through ``mixer_vit.runtime.paths``; here a short digits
run with its workdir on ``ram://`` writes them, resumes after a simulated crash (its metrics and
TensorBoard events rewritten on the store) and is read back by ``load_workdir``, ``infer`` and
``evaluate``. The lease that replaces the ``fcntl`` lock on such stores refuses a second writer and
takes over a stale lease.

What this cannot cover offline: Orbax writes its arrays through TensorStore, whose drivers know
local files and ``gs://`` but not TensorFlow's ``ram://`` (and Orbax's ``etils.epath`` knows no
``ram://`` either: ``KeyError: 'ram://'``). So the run below keeps its checkpoints in a local
folder through the one seam ``workdir.files.checkpoint_dir`` (monkeypatched here only), while
``test_orbax_gets_the_url_unchanged`` checks that a real ``gs://`` workdir hands Orbax
``gs://bucket/run/checkpoints`` as it is. Real GCS (permissions, latency, consistency) is not
reached from the tests at all.
"""

import json
import os
import shutil
import time
import uuid

import numpy as np
from PIL import Image
import pytest
from tensorboard.compat.proto import event_pb2
import tensorflow as tf
from test_train import compilation_cache_for_repeated_runs  # noqa: F401  (autouse fixture)
from test_train import flat
from test_train import tiny_config

from mixer_vit import evaluate
from mixer_vit import infer
from mixer_vit import workdir as workdir_lib
from mixer_vit.models import params_io
from mixer_vit.runtime import paths
from mixer_vit.training import metrics
from mixer_vit.training import train
from mixer_vit.workdir import checkpoints as workdir_checkpoints
from mixer_vit.workdir import files as workdir_files
from mixer_vit.workdir import locks as workdir_locks

gfile = tf.io.gfile


def ram_dir(name: str) -> str:
  """A fresh folder on the process-wide ``ram://`` store."""
  return f'ram://mixer_vit_test_{uuid.uuid4().hex[:8]}/{name}'


def files_under(url: str) -> dict[str, bytes]:
  out = {}
  for folder, _, names in gfile.walk(url):
    for name in names:
      path = paths.join(folder, name)
      out[path[len(url) + 1 :]] = paths.read_bytes(path)
  return out


@pytest.fixture(autouse=True)
def no_settling(monkeypatch):
  """The lease's read-back wait (2 s by default) is for real stores; ram:// needs none."""
  monkeypatch.setattr(workdir_locks, 'LEASE_SETTLE_S', 0.0)


# ---------------------------------------------------------------------------------------------
# The path layer.


def test_urls_keep_their_scheme_and_local_paths_behave_as_before(tmp_path, monkeypatch):
  assert paths.join('gs://bucket/run', 'checkpoints') == 'gs://bucket/run/checkpoints'
  assert paths.join('gs://bucket/run/', 'a', 'b') == 'gs://bucket/run/a/b'
  assert paths.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert paths.dirname('gs://bucket/run/train.lock') == 'gs://bucket/run'
  assert workdir_lib.checkpoint_dir('gs://bucket/run') == 'gs://bucket/run/checkpoints'
  local = str(tmp_path / 'run')
  assert paths.join(local, 'x') == os.path.join(local, 'x')
  assert workdir_lib.checkpoint_dir('rel/run') == os.path.join(
    os.path.abspath('rel/run'), 'checkpoints'
  )
  # A local write goes through a temporary file beside the target, renamed over it.
  paths.makedirs(local)
  target = os.path.join(local, 'config.json')
  paths.write_text(target, 'old')
  seen = []
  real_replace = os.replace
  monkeypatch.setattr(os, 'replace', lambda a, b: (seen.append((a, b)), real_replace(a, b)))
  workdir_lib.write_json(target, {'a': 1})
  assert [b for _, b in seen] == [target] and json.loads(paths.read_text(target)) == {'a': 1}
  assert os.path.dirname(os.path.dirname(seen[0][0])) == local and os.listdir(local) == [
    'config.json'
  ]


def test_files_on_ram_are_written_read_appended_and_moved():
  root = ram_dir('run')
  paths.makedirs(root)
  paths.write_text(paths.join(root, 'a.json'), '{"x": 1}')
  paths.write_text(paths.join(root, 'a.json'), '{"x": 2}')  # Replaced in one object write.
  assert json.loads(paths.read_text(paths.join(root, 'a.json'))) == {'x': 2}
  paths.append_text(paths.join(root, 'rows.jsonl'), '1\n')
  paths.append_text(paths.join(root, 'rows.jsonl'), '2\n')
  assert paths.read_text(paths.join(root, 'rows.jsonl')) == '1\n2\n'
  with pytest.raises(FileNotFoundError, match='missing.json'):
    paths.read_text(paths.join(root, 'missing.json'))
  # A damaged checkpoint is moved aside object by object, its content kept.
  step = paths.join(root, 'checkpoints', '7')
  paths.makedirs(paths.join(step, 'sub'))
  paths.write_bytes(paths.join(step, 'x'), b'X')
  paths.write_bytes(paths.join(step, 'sub', 'y'), b'Y')
  directory = paths.join(root, 'checkpoints')
  assert workdir_checkpoints.move_checkpoint_aside(directory, 7) == paths.join(
    directory, '7.corrupt'
  )
  assert paths.listdir(directory) == ['7.corrupt']
  assert files_under(paths.join(directory, '7.corrupt')) == {'x': b'X', 'sub/y': b'Y'}
  paths.makedirs(step)
  paths.write_bytes(paths.join(step, 'x'), b'Z')
  assert workdir_checkpoints.move_checkpoint_aside(directory, 7).endswith(
    '/7.corrupt.1'
  )  # Nothing overwritten.
  assert sorted(paths.listdir(directory)) == ['7.corrupt', '7.corrupt.1']


@pytest.mark.parametrize('where', ['local', 'ram'])
def test_an_interrupted_atomic_write_leaves_the_file_as_it_was(tmp_path, where):
  """paths.atomic_writer (used by write_bytes and params_io.save_npz): an error inside the block
  keeps the old content and leaves no temporary file."""
  folder = str(tmp_path) if where == 'local' else f'ram://atomic-{uuid.uuid4().hex}'
  paths.makedirs(folder)
  target = paths.join(folder, 'file.bin')
  paths.write_bytes(target, b'old')
  with pytest.raises(RuntimeError, match='interrupted'):
    with paths.atomic_writer(target) as f:
      f.write(b'half of the new')
      raise RuntimeError('interrupted')
  assert paths.read_bytes(target) == b'old'
  assert paths.listdir(folder) == ['file.bin']
  with paths.atomic_writer(target) as f:
    f.write(b'new')
  assert paths.read_bytes(target) == b'new'


def test_orbax_gets_the_url_unchanged(monkeypatch):
  seen = []
  monkeypatch.setattr(
    workdir_checkpoints.ocp, 'CheckpointManager', lambda directory, **kwargs: seen.append(directory)
  )
  workdir_lib.make_manager('gs://bucket/runs/a', read_only=True)
  assert seen == ['gs://bucket/runs/a/checkpoints']


# ---------------------------------------------------------------------------------------------
# A training run on ram://.


def _points(workdir) -> dict[str, list[int]]:
  points = {}
  for name in sorted(paths.listdir(workdir)):
    if 'tfevents' in name:
      for record in tf.data.TFRecordDataset(paths.join(workdir, name)).as_numpy_iterator():
        for value in event_pb2.Event.FromString(record).summary.value:
          points.setdefault(value.tag, []).append(event_pb2.Event.FromString(record).step)
  return points


def test_a_run_on_ram_writes_resumes_and_is_read_back(tmp_path, monkeypatch, capsys):
  workdir = ram_dir('run')
  local_checkpoints = str(tmp_path / 'checkpoints')
  # The seam: Orbax/TensorStore cannot write to ram:// (see the module docstring).
  monkeypatch.setattr(
    workdir_files, 'checkpoint_dir', lambda w: local_checkpoints if w == workdir else pytest.fail(w)
  )
  config = tiny_config(total_steps=6, checkpoint_every=3, eval_every=6)
  first = train.train_and_evaluate(config, workdir)
  assert first['step'] == 6 and not first['stopped_early']
  names = set(paths.listdir(workdir))
  expected = {
    workdir_lib.CONFIG_FILE,
    workdir_lib.DATASET_INFO_FILE,
    workdir_lib.METRICS_FILE,
    workdir_lib.HISTORY_FILE,
    workdir_lib.PARAMS_FILE,
  }
  assert expected <= names and any('tfevents' in n for n in names)
  assert workdir_lib.LOCK_FILE not in names  # The lease is removed when the run ends.
  assert not any(n.endswith('.tmp') for n in names)  # No temporary object on the store.
  assert sorted(os.listdir(local_checkpoints)) == ['3', '6']
  assert workdir_lib.checkpoint_steps(workdir) == [3, 6]
  assert workdir_lib.read_config(workdir).total_steps == 6

  # A crash that lost the checkpoint of step 6 after its metrics were written: the resume from
  # step 3 drops rows 4-6 of metrics.jsonl and of the events on the store, then writes them again.
  shutil.rmtree(os.path.join(local_checkpoints, '6'))
  config.total_steps = 10
  second = train.train_and_evaluate(config, workdir)
  assert second['step'] == 10
  rows = metrics.read_jsonl(paths.join(workdir, workdir_lib.METRICS_FILE))
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, 11))
  assert [r['step'] for r in rows if 'test_accuracy' in r] == [6, 10]  # Each once.
  assert _points(workdir)['loss'] == list(range(1, 11))
  history = workdir_lib.read_history(workdir)
  assert [(h['event'], h['step']) for h in history] == [('start', 0), ('resume', 3)]
  assert history[1]['changes'] == {'total_steps': [6, 10]}

  # Read back by every reader, from the URL.
  assert workdir_lib.is_workdir(workdir)
  trained = workdir_lib.load_workdir(workdir)
  assert trained.step == 10 and trained.class_names == [str(i) for i in range(10)]
  saved = flat(params_io.load_npz(paths.join(workdir, workdir_lib.PARAMS_FILE)))
  for key, value in flat(params_io.unstack_layers(trained.params)).items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)
  image = str(tmp_path / 'digit.png')
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)).save(image)
  capsys.readouterr()
  assert infer.main([f'--checkpoint={workdir}', '--top_k=3', '--json', image]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result['file'] == image and len(result['predictions']) == 3
  assert evaluate.main([f'--checkpoint={workdir}', '--json']) == 0
  result = json.loads(capsys.readouterr().out)
  assert result['examples'] == 299
  assert result['top1'] == pytest.approx(second['test_accuracy'], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The lease.


def _foreign_lease(workdir, age_s, host='another-host', pid=4242):
  lease = {
    'host': host,
    'pid': pid,
    'since': '2026-01-01T00:00:00+00:00',
    'renewed': time.time() - age_s,
    'renewed_at': 'then',
    'token': 'theirs',
  }
  paths.makedirs(workdir)
  paths.write_text(paths.join(workdir, workdir_lib.LOCK_FILE), json.dumps(lease))
  return lease


def test_a_fresh_lease_of_another_run_refuses_a_second_writer(monkeypatch):
  workdir = ram_dir('busy')
  _foreign_lease(workdir, age_s=30)
  before = files_under(workdir)
  monkeypatch.setattr(train.data, 'make_train_iterator', lambda *a: pytest.fail('data was read'))
  with pytest.raises(workdir_lib.WorkdirBusyError) as e:
    train.train_and_evaluate(tiny_config(), workdir)
  message = str(e.value)
  lease_path = paths.join(workdir, workdir_lib.LOCK_FILE)
  assert 'PID 4242 on another-host' in message and lease_path in message
  assert f'gsutil rm {lease_path}' in message and '600 s' in message
  assert files_under(workdir) == before  # Nothing written, the lease untouched.

  # A live lease of this process (another run in-process) refuses too.
  other = ram_dir('busy2')
  with workdir_lib.LeaseLock(other) as held:
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f'PID {os.getpid()} on '):
      workdir_lib.LeaseLock(other).acquire()
    assert json.loads(paths.read_text(held.path))['token'] == held._token
  assert not paths.exists(held.path)  # Released: removed.


def test_a_stale_lease_is_taken_over_with_a_warning(caplog):
  workdir = ram_dir('stale')
  _foreign_lease(workdir, age_s=workdir_lib.LEASE_TIMEOUT_S + 5)
  lock = workdir_lib.LeaseLock(workdir)
  with caplog.at_level('WARNING'):
    lock.acquire()
  try:
    assert 'Taking over the lease' in caplog.text and 'PID 4242 on another-host' in caplog.text
    assert 'stale' in caplog.text
    lease = json.loads(paths.read_text(lock.path))
    assert lease['pid'] == os.getpid() and lease['token'] != 'theirs'
  finally:
    lock.release()
  # A lease left by a process of this host that no longer runs is taken at once, however fresh.
  dead = 2**22 + 12345  # Above Linux's default pid_max (4194304): no such process.
  _foreign_lease(workdir, age_s=1, host=workdir_locks.socket.gethostname(), pid=dead)
  with workdir_lib.LeaseLock(workdir):
    pass


def test_the_lease_is_renewed_and_a_lost_lease_is_reported(caplog):
  workdir = ram_dir('renew')
  lock = workdir_lib.LeaseLock(workdir, renew_s=0.05)
  lock.acquire()
  try:
    first = json.loads(paths.read_text(lock.path))['renewed']
    deadline = time.time() + 10
    while json.loads(paths.read_text(lock.path))['renewed'] == first and time.time() < deadline:
      time.sleep(0.02)
    assert json.loads(paths.read_text(lock.path))['renewed'] > first
    _foreign_lease(workdir, age_s=0)  # Another run overwrote it (e.g. deleted by hand, retaken).
    with caplog.at_level('ERROR'):
      while not lock.lost and time.time() < deadline:
        time.sleep(0.02)
    assert lock.lost and 'taken by PID 4242 on another-host' in caplog.text
  finally:
    lock.release()
  assert json.loads(paths.read_text(lock.path))['token'] == 'theirs'  # Not removed: not ours.


def test_two_runs_writing_the_lease_at_once_leave_one_writer(monkeypatch):
  workdir = ram_dir('race')
  lock = workdir_lib.LeaseLock(workdir, settle_s=1.0)
  # The other run writes its lease while this one waits to read its own back.
  monkeypatch.setattr(workdir_locks.time, 'sleep', lambda s: _foreign_lease(workdir, age_s=0))
  with pytest.raises(workdir_lib.WorkdirBusyError, match='at the same time'):
    lock.acquire()
  assert json.loads(paths.read_text(lock.path))['token'] == 'theirs'
