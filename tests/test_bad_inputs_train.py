"""Bad inputs to the trainer, each refused with one line naming the culprit, user files untouched.

Table-driven: every case prepares a config and a workdir (or a command line), runs the trainer
in-process (the command line only where the case is about it), and asserts the error, that its
message is one line naming the culprit, that every file the case made is byte-identical
afterwards, and, for the refusals that can come early, that nothing was compiled. One tiny trained
workdir (module fixture) is copied by the cases that need a finished run.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from typing import Any

import numpy as np
from PIL import Image
import pytest
from test_train import compilation_cache_for_repeated_runs  # noqa: F401  (autouse fixture)
from test_train import tiny_config
from test_train_cli import main_command
from test_train_cli import signal_a_running_training
from test_train_cli import subprocess_env

from mixer_vit import data
from mixer_vit import main
from mixer_vit import workdir as workdir_lib
from mixer_vit.runtime import paths
from mixer_vit.training import config_utils
from mixer_vit.training import metrics
from mixer_vit.training import steps
from mixer_vit.training import stopping
from mixer_vit.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 4
NOT_USER_FILES = (workdir_lib.LOCK_FILE,)  # Rewritten by every run that takes the lock.


def snapshot(root) -> dict[str, bytes | None]:
  """Every file (bytes) and folder (None) under ``root`` (a file: itself), lock files left out."""
  root = str(root)
  if os.path.isfile(root):
    return {'': pathlib.Path(root).read_bytes()}
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(folder, name), root)] = None
    for name in files:
      if name in NOT_USER_FILES:
        continue
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = pathlib.Path(path).read_bytes()
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished tiny run: checkpoints of steps 2 and 4, params.npz, an evaluation at step 4."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  config = tiny_config(total_steps=TOTAL, checkpoint_every=2, eval_every=TOTAL)
  train.train_and_evaluate(config, workdir)
  assert workdir_lib.checkpoint_steps(workdir) == [2, 4]
  return config, workdir


@dataclasses.dataclass
class Ctx:
  """What a case prepares from: a private folder and the finished run to copy."""

  tmp: pathlib.Path
  trained: tuple[Any, str]

  def copy_run(self) -> tuple[Any, str]:
    config, workdir = self.trained
    target = str(self.tmp / 'run')
    shutil.copytree(workdir, target)
    return config.copy_and_resolve_references(), target


def _images(root: pathlib.Path, sizes: dict[str, dict[str, list[tuple[int, int]]]]) -> str:
  """An image folder: sizes[split][class] lists the (height, width) of its PNG files."""
  rng = np.random.default_rng(0)
  for split, classes in sizes.items():
    for name, shapes in classes.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(folder / f'{i}.png')
  return str(root)


def _folder_config(root: str, pp: str = 'decode|value_range(-1,1)|onehot') -> Any:
  return tiny_config(dataset=root, pp_train=pp, pp_test=pp, batch_size=8, eval_batch_size=8)


def _square(n):
  return [(8, 8)] * n


# ---------------------------------------------------------------------------------------------
# The table: name -> (prepare, error type, culprit text, early). `prepare(ctx)` returns
# (config, workdir, user paths); `early`: refused before anything is compiled.

Prepare = Callable[[Ctx], tuple[Any, str, list[str]]]


def fresh(**overrides) -> Prepare:
  return lambda ctx: (tiny_config(**overrides), str(ctx.tmp / 'new'), [])


def model_override(path: str, value) -> Prepare:
  def prepare(ctx):
    config = tiny_config()
    node = config.model
    *parents, last = path.split('.')
    for key in parents:
      node = node[key]
    node[last] = value
    return config, str(ctx.tmp / 'new'), []

  return prepare


def user_folder(files: dict[str, bytes]) -> Prepare:
  def prepare(ctx):
    folder = ctx.tmp / 'mine'
    folder.mkdir()
    for name, content in files.items():
      (folder / name).write_bytes(content)
    return tiny_config(), str(folder), [str(folder)]

  return prepare


def user_file(ctx):
  path = ctx.tmp / 'notes.txt'
  path.write_text('my notes\n')
  return tiny_config(), str(path), [str(path)]


def copied_config_only(ctx):
  """A folder with a config.json of this project (copied) and the user's own params.npz."""
  _, workdir = ctx.trained
  folder = ctx.tmp / 'mine'
  folder.mkdir()
  shutil.copy(os.path.join(workdir, workdir_lib.CONFIG_FILE), folder)
  (folder / 'params.npz').write_bytes(b'my own parameters')
  return tiny_config(), str(folder), [str(folder)]


def finished_without_checkpoints(keep_params: bool) -> Prepare:
  def prepare(ctx):
    config, workdir = ctx.copy_run()
    shutil.rmtree(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
    if not keep_params:
      os.remove(os.path.join(workdir, workdir_lib.PARAMS_FILE))
    config.seed = 7
    return config, workdir, [workdir]

  return prepare


def started_without_checkpoint(ctx):
  """A run that crashed during set-up (config.json, no checkpoint), relaunched with another lr."""
  config, workdir = ctx.copy_run()
  for name in (workdir_lib.CHECKPOINT_DIR,):
    shutil.rmtree(os.path.join(workdir, name))
  for name in (workdir_lib.PARAMS_FILE, workdir_lib.METRICS_FILE):
    os.remove(os.path.join(workdir, name))
  config.lr = 0.5
  return config, workdir, [workdir]


def changed(**values) -> Prepare:
  def prepare(ctx):
    config, workdir = ctx.copy_run()
    config.update(values)
    return config, workdir, [workdir]

  return prepare


def unreadable_config_json(ctx):
  config, workdir = ctx.copy_run()
  pathlib.Path(workdir, workdir_lib.CONFIG_FILE).write_text('{"model_name": ')
  return config, workdir, [workdir]


def every_checkpoint_damaged(ctx):
  config, workdir = ctx.copy_run()
  for folder, _, files in os.walk(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)):
    for name in files:
      if os.path.basename(folder) == 'd':  # TensorStore's data files.
        path = os.path.join(folder, name)
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
  config.total_steps = TOTAL + 2
  return config, workdir, [workdir]


def image_folder(sizes, pp='decode|value_range(-1,1)|onehot') -> Prepare:
  def prepare(ctx):
    root = _images(ctx.tmp / 'images', sizes)
    return _folder_config(root, pp), str(ctx.tmp / 'new'), [root]

  return prepare


TWO = {'cat': _square(4), 'dog': _square(4)}
CASES: dict[str, tuple[Prepare, type, str, bool]] = {
  # Counts and sizes: the key named.
  'total_steps 0': (fresh(total_steps=0), ValueError, 'config.total_steps', True),
  'total_steps negative': (fresh(total_steps=-5), ValueError, 'config.total_steps', True),
  'batch_size 0': (fresh(batch_size=0), ValueError, 'config.batch_size', True),
  'batch_size negative': (fresh(batch_size=-8), ValueError, 'config.batch_size', True),
  'eval_batch_size 0': (fresh(eval_batch_size=0), ValueError, 'config.eval_batch_size', True),
  'accum_steps 0': (fresh(accum_steps=0), ValueError, 'accum_steps', True),
  'warmup_steps negative': (fresh(warmup_steps=-1), ValueError, 'config.warmup_steps', True),
  'log_every 0': (fresh(log_every=0), ValueError, 'log_every', True),
  'checkpoint_every 0': (fresh(checkpoint_every=0), ValueError, 'checkpoint_every', True),
  'hidden_size negative': (
    model_override('hidden_size', -32),
    ValueError,
    'config.model.hidden_size',
    True,
  ),
  'num_layers 0': (
    model_override('transformer.num_layers', 0),
    ValueError,
    'config.model.transformer.num_layers',
    True,
  ),
  'num_heads 0': (
    model_override('transformer.num_heads', 0),
    ValueError,
    'config.model.transformer.num_heads',
    True,
  ),
  'batch not divisible': (fresh(batch_size=12), ValueError, 'batch_size', True),
  # Already handled well before.
  'unknown model': (fresh(model_name='ViT-Nope_16'), ValueError, 'ViT-Nope_16', True),
  'bad pp string': (fresh(pp_train='decod|onehot'), ValueError, 'config.pp_train', True),
  'missing pretrained file': (
    fresh(pretrained='/no/such/ViT.npz'),
    FileNotFoundError,
    'ViT.npz',
    True,
  ),
  'unknown data set': (fresh(dataset='no_such_set'), FileNotFoundError, 'no_such_set', True),
  # The workdir.
  'workdir empty': (
    lambda ctx: (tiny_config(), '', []),
    workdir_lib.WorkdirError,
    '--workdir is empty',
    True,
  ),
  'workdir is a file': (user_file, workdir_lib.WorkdirError, 'is a file', True),
  "user's params, metrics and config": (
    user_folder(
      {
        'params.npz': b'my parameters',
        'metrics.jsonl': b'{"step": 1, "loss": 0.5}\n',
        'config.json': b'{"lr": 0.1}',
      }
    ),
    workdir_lib.WorkdirError,
    'config.json, metrics.jsonl, params.npz',
    True,
  ),
  "folder of a user's photos": (
    user_folder({f'photo{i}.jpg': bytes([i]) * 10 for i in range(6)}),
    workdir_lib.WorkdirError,
    'photo0.jpg, photo1.jpg, photo2.jpg, photo3.jpg and 2 more',
    True,
  ),
  'a copied config.json, no run': (
    copied_config_only,
    workdir_lib.WorkdirError,
    'not a workdir of this project',
    True,
  ),
  'finished, checkpoints deleted, another seed': (
    finished_without_checkpoints(keep_params=True),
    workdir_lib.WorkdirError,
    'holds a finished run (params.npz)',
    True,
  ),
  'finished, checkpoints and params deleted': (
    finished_without_checkpoints(keep_params=False),
    workdir_lib.WorkdirError,
    'metrics.jsonl with its evaluation at step 4 of 4',
    True,
  ),
  'no checkpoint yet, another lr': (
    started_without_checkpoint,
    workdir_lib.ConfigChangeError,
    'lr: 0.01 -> 0.5',
    True,
  ),
  'config change on a finished run': (
    changed(seed=3),
    workdir_lib.ConfigChangeError,
    'seed: 0 -> 3',
    True,
  ),
  'unreadable config.json': (
    unreadable_config_json,
    workdir_lib.WorkdirError,
    'config.json',
    True,
  ),
  'every checkpoint damaged': (
    every_checkpoint_damaged,
    workdir_lib.CheckpointRestoreError,
    'none of the checkpoints',
    True,
  ),
  # Image folders: checked before the first step, in both splits.
  'empty class in train': (
    image_folder({'train': {**TWO, 'horse': []}, 'test': {**TWO, 'horse': _square(2)}}),
    ValueError,
    'train/horse has no images',
    True,
  ),
  'empty class in test': (
    image_folder({'train': {**TWO, 'horse': _square(4)}, 'test': {**TWO, 'horse': []}}),
    ValueError,
    'test/horse has no images',
    True,
  ),
  'odd-sized image in train': (
    image_folder({'train': {'cat': _square(4), 'dog': [(8, 8)] * 3 + [(6, 5)]}, 'test': TWO}),
    ValueError,
    'dog/3.png is 5x6',
    True,
  ),
  'odd-sized image in test': (
    image_folder({'train': TWO, 'test': {'cat': [(8, 8), (20, 20)], 'dog': _square(2)}}),
    ValueError,
    "cat/1.png is 20x20 but the other images of split 'test'",
    True,
  ),
}


@pytest.fixture
def no_compiling(monkeypatch):
  """Fails a case that gets as far as building its first state or train step."""

  def compiled(*_, **__):
    raise AssertionError('got as far as compiling')

  monkeypatch.setattr(train, '_initial_state', compiled)
  monkeypatch.setattr(steps, 'make_train_step', compiled)


@pytest.mark.parametrize('name', list(CASES))
def test_refused_in_one_line_naming_the_culprit(name, trained, tmp_path, request):
  prepare, error, culprit, early = CASES[name]
  if early:
    request.getfixturevalue('no_compiling')
  config, workdir, user_paths = prepare(Ctx(tmp_path, trained))
  before = {path: snapshot(path) for path in user_paths}
  with pytest.raises(error) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert '\n' not in message.strip(), message
  assert culprit in message, message
  for path, files in before.items():
    assert snapshot(path) == files, path
  if workdir and not user_paths:
    assert not os.path.exists(workdir)  # Nothing written for a refused new run.


# ---------------------------------------------------------------------------------------------
# Cases that need their own checks.


def test_an_image_folder_of_mixed_sizes_passes_when_the_preprocessing_resizes(tmp_path):
  sizes = {'train': {'cat': [(8, 8), (20, 20)], 'dog': _square(2)}, 'test': TWO}
  root = _images(tmp_path / 'images', sizes)
  data.check_image_sizes(_folder_config(root, 'decode|resize(8)|value_range(-1,1)|onehot'))
  with pytest.raises(ValueError, match=r'add a resize to config.pp_train \(e.g. decode\|resize'):
    data.check_image_sizes(_folder_config(root))


def test_a_read_only_workdir_is_one_line(tmp_path, monkeypatch, no_compiling):
  folder = tmp_path / 'readonly'
  real_open = os.open

  def read_only(path, *args, **kwargs):  # As root, chmod would not stop the write.
    if str(path).startswith(str(folder)):
      raise PermissionError(errno.EROFS, 'Read-only file system', str(path))
    return real_open(path, *args, **kwargs)

  folder.mkdir()
  monkeypatch.setattr(os, 'open', read_only)
  with pytest.raises(workdir_lib.WorkdirError) as e:
    train.train_and_evaluate(tiny_config(), str(folder))
  message = str(e.value)
  assert message.startswith(f'cannot write in --workdir={folder} (Read-only file system')
  assert '\n' not in message and os.listdir(folder) == []


def test_a_full_disk_is_one_line_and_the_run_resumes(trained, tmp_path, monkeypatch):
  config, workdir = Ctx(tmp_path, trained).copy_run()
  config.total_steps = TOTAL + 4

  def full(*_, **__):
    raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(workdir, 'checkpoints'))

  monkeypatch.setattr(workdir_lib, 'save_checkpoint', full)
  with pytest.raises(workdir_lib.WorkdirError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert message.startswith(f'no space left to write in {workdir} (No space left on device: ')
  assert 'run the same command again' in message and '\n' not in message
  monkeypatch.undo()
  assert train.train_and_evaluate(config, workdir)['step'] == TOTAL + 4


def test_a_full_disk_inside_orbax_names_the_file():
  inner = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.head/0" in OCDBT database at local file '
    '"/w/checkpoints/5.orbax-checkpoint-tmp/": Failed writing: "/w/checkpoints/5/d/83df": Failed '
    "to write 533170 bytes to file 5: No space left on device [os_error_code='28']"
  )
  try:
    try:
      raise inner
    except ValueError as e:
      raise RuntimeError('Save Finalize thread (save_finalize) failed.') from e
  except RuntimeError as e:
    outer = e
  assert paths.disk_full_reason(outer) == 'No space left on device: /w/checkpoints/5/d/83df'
  assert paths.disk_full_reason(OSError(errno.EACCES, 'Permission denied', '/w')) is None


def test_a_failing_final_evaluation_keeps_the_trained_state(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  config = tiny_config(total_steps=3, checkpoint_every=1000)

  def broken(*_, **__):
    raise ValueError('an odd-sized test image')

  monkeypatch.setattr(data, 'make_eval_iterator', broken)
  with pytest.raises(ValueError, match='odd-sized test image'):
    train.train_and_evaluate(config, workdir)
  assert workdir_lib.checkpoint_steps(workdir) == [3]
  assert os.path.exists(os.path.join(workdir, workdir_lib.PARAMS_FILE))
  monkeypatch.undo()
  os.remove(os.path.join(workdir, workdir_lib.PARAMS_FILE))  # As if killed before writing it.
  result = train.train_and_evaluate(config, workdir)  # Evaluates only: nothing trained again.
  assert os.path.exists(os.path.join(workdir, workdir_lib.PARAMS_FILE))
  assert result['step'] == 3 and 'test_accuracy' in result
  rows = metrics.read_jsonl(os.path.join(workdir, workdir_lib.METRICS_FILE))
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3]


def test_a_run_restarts_over_a_crashed_set_up_with_the_same_config(trained, tmp_path):
  config, workdir = Ctx(tmp_path, trained).copy_run()
  shutil.rmtree(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
  for name in (workdir_lib.PARAMS_FILE, workdir_lib.METRICS_FILE):
    os.remove(os.path.join(workdir, name))
  config.total_steps = 3  # May change.
  assert train.train_and_evaluate(config, workdir)['step'] == 3
  assert [h['event'] for h in workdir_lib.read_history(workdir)] == ['start', 'restart']


def test_workdirs_of_this_project_are_resumed_and_old_ones_adopted(trained, tmp_path, caplog):
  config, workdir = Ctx(tmp_path, trained).copy_run()
  marker = os.path.join(workdir, workdir_lib.MARKER_FILE)
  assert json.loads(pathlib.Path(marker).read_text())['adopted'] is False
  assert workdir_lib.check_ownership(workdir) == workdir_lib.OURS
  os.remove(marker)  # A workdir written before the marker existed.
  assert workdir_lib.check_ownership(workdir) == workdir_lib.ADOPT
  params = pathlib.Path(workdir, workdir_lib.PARAMS_FILE).read_bytes()
  with caplog.at_level('WARNING'):
    assert train.train_and_evaluate(config, workdir)['step'] == TOTAL  # Evaluates only.
  assert [r.getMessage() for r in caplog.records if 'Adopted' in r.getMessage()] == [
    f'Adopted {workdir}, a workdir of this project written before workdirs were marked: wrote '
    f'{workdir_lib.MARKER_FILE}.'
  ]
  assert json.loads(pathlib.Path(marker).read_text())['adopted'] is True
  assert pathlib.Path(workdir, workdir_lib.PARAMS_FILE).read_bytes() == params
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert workdir_lib.check_ownership(str(empty)) == workdir_lib.NEW
  assert workdir_lib.check_ownership(str(tmp_path / 'missing')) == workdir_lib.NEW


def test_a_url_workdir_of_user_files_is_refused(no_compiling):
  import tensorflow as tf  # noqa: PLC0415

  folder = 'ram://bad_inputs_train/mine'
  tf.io.gfile.makedirs(folder)
  with tf.io.gfile.GFile(folder + '/params.npz', 'wb') as f:
    f.write(b'mine')
  with pytest.raises(workdir_lib.WorkdirError, match='it holds params.npz; no .mixer_vit'):
    train.train_and_evaluate(tiny_config(), folder)
  with tf.io.gfile.GFile(folder + '/params.npz', 'rb') as f:
    assert f.read() == b'mine'
  assert workdir_lib.check_ownership('ram://bad_inputs_train/new') == workdir_lib.NEW


def test_a_workdir_lock_held_by_another_run(trained, tmp_path, no_compiling):
  config, workdir = Ctx(tmp_path, trained).copy_run()
  before = snapshot(workdir)
  with workdir_lib.WorkdirLock(workdir):
    with pytest.raises(workdir_lib.WorkdirBusyError) as e:
      train.train_and_evaluate(config, workdir)
  assert f'PID {os.getpid()} on ' in str(e.value) and '\n' not in str(e.value)
  assert snapshot(workdir) == before


@pytest.mark.parametrize(
  'spec, culprit',
  [
    ('configs/cifar10.py:epochs=abc', "epochs='abc' is not a valid int; give e.g. epochs=35"),
    ('configs/digits.py:bogus=1', "unknown name 'bogus'"),
    ('configs/finetune.py:testing,digits,resolution=x', "resolution='x' is not a valid int"),
    ('configs/finetune.py:testing,digits,steps=1', "unknown name 'steps'"),
  ],
)
def test_bad_config_arguments_name_the_argument(spec, culprit):
  with pytest.raises(ValueError) as e:
    config_utils.load_config(REPO / spec)
  assert culprit in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize(
  'value, culprit',
  [
    ('configs/nope.py:vit', 'config file configs/nope.py not found'),
    ('configs/cifar10', '--config=configs/cifar10.py.'),
    ('configs', 'configs is a folder'),
    ('README.md', 'README.md is not a config file'),
    ('', '--config is empty'),
  ],
)
def test_config_paths_are_one_line(value, culprit, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as e:
    main.check_config_file(['main', f'--config={value}', '--workdir=x'])
  message = str(e.value.code)
  assert message.startswith('error: ') and culprit in message and '\n' not in message
  main.check_config_file(['main', '--config=configs/digits.py:vit'])  # A good one passes.


# ---------------------------------------------------------------------------------------------
# The command line: a few subprocesses.


@pytest.mark.parametrize(
  'args, culprit',
  [
    (['--config=configs/cifar10.py:epochs=abc'], "epochs='abc' is not a valid int"),
    (['--config=configs/digits.py', '--config.total_step=3'], 'total_steps'),
  ],
)
def test_command_line_errors_are_one_line(args, culprit, tmp_path):
  out = subprocess.run(
    main_command(*args, f'--workdir={tmp_path / "run"}'),
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.returncode == 1, out.stderr[-2000:]
  assert culprit in out.stderr and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / 'run').exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
  workdir = tmp_path / 'run'
  returncode, output, jsonl = signal_a_running_training(workdir, signal.SIGINT)
  assert returncode == stopping.CTRL_C_EXIT_STATUS, output[-3000:]
  assert 'Ctrl-C: saving a checkpoint' in output and 'run the same command again' in output
  assert 'Traceback' not in output and 'KeyboardInterrupt' not in output
  saved = workdir_lib.checkpoint_steps(str(workdir))
  last_logged = metrics.read_jsonl(str(jsonl))[-1]['step']
  assert saved == [last_logged] and 0 < last_logged < 100000


def test_a_second_ctrl_c_exits_at_once():
  script = (
    'import os, signal, time\n'
    'from mixer_vit.training import stopping\n'
    'stopping.catch_sigterm()\n'
    'os.kill(os.getpid(), signal.SIGINT)\n'
    'time.sleep(0.2)\n'
    'print("first caught", flush=True)\n'
    'os.kill(os.getpid(), signal.SIGINT)\n'
    'time.sleep(30)\n'
    'print("not reached", flush=True)\n'
  )
  out = subprocess.run(
    [sys.executable, '-c', script],
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.returncode == stopping.CTRL_C_EXIT_STATUS, out.stderr[-2000:]
  assert out.stdout.strip() == 'first caught'
  assert 'Second Ctrl-C: exiting now' in out.stderr


def test_in_process_a_second_ctrl_c_is_a_keyboard_interrupt(monkeypatch):
  monkeypatch.setattr(stopping, '_EXIT_ON_SECOND_CTRL_C', [False])
  stopping._CTRL_C.clear()
  stopping._SIGTERM.clear()
  try:
    stopping._on_sigterm(signal.SIGINT)
    assert stopping.stopped_by_ctrl_c() and stopping._SIGTERM.is_set()
    with pytest.raises(KeyboardInterrupt):
      stopping._on_sigterm(signal.SIGINT)
  finally:
    stopping._CTRL_C.clear()
    stopping._SIGTERM.clear()
