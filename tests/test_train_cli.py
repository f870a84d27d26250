"""The command line: help, unknown config keys, and SIGTERM (save, then exit cleanly)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

from mixer_vit import workdir as workdir_lib
from mixer_vit.training import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def main_command(*args):
  return [sys.executable, '-m', 'mixer_vit.main', *args]


def subprocess_env():
  # The test set-up's 8 fake devices, private TFDS_DATA_DIR etc. are inherited.
  return dict(os.environ, PYTHONPATH=str(REPO))


def test_help_lists_the_flags():
  out = subprocess.run(
    main_command('--help'),
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  # absl's --help exits with status 1 by design; the usage text is what matters.
  assert 'Trains or fine-tunes' in out.stdout, out.stderr
  for flag in ('--config', '--workdir', '--[no]multihost'):
    assert flag in out.stdout


def test_unknown_config_key_is_a_clear_error(tmp_path):
  out = subprocess.run(
    main_command('--config=configs/digits.py', f'--workdir={tmp_path}', '--config.total_step=3'),
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.returncode != 0
  assert 'Unknown config key' in out.stderr and 'total_steps' in out.stderr  # Did you mean.
  assert not os.path.exists(tmp_path / 'checkpoints')


def signal_a_running_training(workdir, signum) -> tuple[int, str, pathlib.Path]:
  """Starts a long digits run in ``workdir``, sends ``signum`` once it has logged two steps and
  returns its exit status, its output and its metrics.jsonl."""
  process = subprocess.Popen(
    main_command(
      '--config=configs/digits.py',
      f'--workdir={workdir}',
      '--config.total_steps=100000',
      '--config.log_every=1',
      '--config.checkpoint_every=100000',
      '--config.model.hidden_size=16',
      '--config.batch_size=16',
    ),
    cwd=REPO,
    env=subprocess_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  jsonl = workdir / workdir_lib.METRICS_FILE
  deadline = time.time() + 180
  while time.time() < deadline and process.poll() is None:
    if jsonl.exists() and jsonl.read_text().count('\n') >= 2:  # Training runs.
      break
    time.sleep(0.5)
  assert process.poll() is None, process.communicate()[0][-3000:]
  process.send_signal(signum)
  output, _ = process.communicate(timeout=120)
  return process.returncode, output, jsonl


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'run'
  returncode, output, jsonl = signal_a_running_training(workdir, signal.SIGTERM)
  assert returncode == 0, output[-3000:]
  assert 'Stopped after step' in output
  steps = workdir_lib.make_manager(str(workdir), None, read_only=True).all_steps()
  last_logged = metrics.read_jsonl(str(jsonl))[-1]['step']
  assert steps == [last_logged] and 0 < last_logged < 100000
  assert not (workdir / 'params.npz').exists()  # Only a finished run writes it.


def test_a_missing_config_file_is_one_line_at_once(tmp_path):
  started = time.monotonic()
  out = subprocess.run(
    main_command('--config=configs/nope.py:vit', f'--workdir={tmp_path / "run"}'),
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  seconds = time.monotonic() - started
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
    'error: config file configs/nope.py not found (--config=configs/nope.py:vit); give the path '
    'of a config file, e.g. --config=configs/digits.py (run from the project root).'
  ]
  assert seconds < 10, seconds  # Before JAX and TensorFlow are imported (< 1 s unloaded).
  assert not (tmp_path / 'run').exists()


def test_errors_are_one_message_and_leave_no_workdir(tmp_path):
  out = subprocess.run(
    main_command(
      '--config=configs/digits.py', f'--workdir={tmp_path / "run"}', '--config.model_name=ViT-X'
    ),
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 1, out.stderr[-3000:]
  assert "error: Unknown model 'ViT-X'" in out.stderr and 'Traceback' not in out.stderr
  assert not (tmp_path / 'run').exists()


def test_any_model_key_is_settable_and_unknown_ones_are_named(tmp_path):
  """--config.model.KEY works for keys the config file does not set (configs/digits.py:vit sets
  no remat and no stochastic_depth); a typo is one line with the closest key."""
  common = ['--config=configs/digits.py:vit', f'--workdir={tmp_path / "run"}', '--dry_run']
  out = subprocess.run(
    main_command(
      *common, '--config.model.remat=True', '--config.model.transformer.num_layers', '1'
    ),
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'temporaries' in out.stdout
  out = subprocess.run(
    main_command(*common, '--config.model.hiden_size=32'),
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert out.returncode == 1 and len(errors) == 1, out.stderr[-2000:]
  assert "'hiden_size'" in errors[0] and "Did you mean 'hidden_size'?" in errors[0]
  assert not (tmp_path / 'run').exists()
