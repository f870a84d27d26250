"""Multi-host training: two processes of 4 CPU devices train like one of 8, to float32 rounding.

Both with the train state sharded over all 8 devices (``mesh.fsdp=8``: each process holds half of
every sharded leaf), so the run also shows that sharded checkpoints, the gathered ``params.npz``
and the evaluation work across processes; ``tests/test_fsdp.py`` shows that fsdp=8 trains like
pure data parallelism.

The two processes are real: ``python -m mixer_vit.main --multihost``, joined by
``jax.distributed`` on 127.0.0.1 (gloo collectives on CPU), writing one workdir. The reference
runs here, in the test process (8 devices), on the same global batches: the data pipeline gives
each process its own part of the data (by design, batches depend on the process count), so the
reference's iterators put the two processes' local batches side by side, as ``shard_batch``
lays them out over the mesh. Everything else (model, steps, loop, workdir) is the real code.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mixer_vit import data
from mixer_vit import workdir as workdir_lib
from mixer_vit.data import pipeline
from mixer_vit.models import params_io
from mixer_vit.runtime import parallel
from mixer_vit.training import config_utils
from mixer_vit.training import metrics
from mixer_vit.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
LOCAL_DEVICES = 4
TIMEOUT_S = 420  # For both processes together; a hang fails the test instead of blocking CI.

# configs/digits.py made tiny. Dropout and stochastic depth stay on: their random masks over the
# global batch must not depend on how the devices are spread over processes.
OVERRIDES = {
  'total_steps': 20,
  'warmup_steps': 2,
  'batch_size': 32,
  'log_every': 5,
  'eval_every': 20,
  'checkpoint_every': 20,
  'model.dropout_rate': 0.1,
  'model.hidden_size': 16,
  'model.transformer.num_layers': 1,
  'model.transformer.mlp_dim': 32,
  'model.transformer.num_heads': 2,
  'mesh.fsdp': 8,
  # The model is too small for the default layout to shard anything: these leaves are sharded.
  'mesh.rules': (
    ('MlpBlock_3/Dense_0/kernel', (None, 'fsdp')),
    ('(query|key|value)/kernel', ('fsdp',)),
    ('out/kernel', (None, None, 'fsdp')),
  ),
}
# The gradients are summed over the 8 devices in another order across processes (gloo) than
# within one: the runs agree to float32 rounding, not bit for bit (observed: parameters at most
# 6e-8 apart, metrics equal or 1 ulp apart). Adam magnifies the rounding noise of a gradient that
# is zero in exact arithmetic, the attention key bias's (softmax ignores it): 4e-5 apart.
RTOL = 1e-5
PARAMS_ATOL = 1e-6
NOISE_ONLY = ('key/bias',)


def _config():
  config = config_utils.load_config(f'{REPO}/configs/digits.py:vit')
  for key, value in OVERRIDES.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _free_port() -> int:
  """A TCP port free on 127.0.0.1 now (the OS picks it: no clash with fixed numbers)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _SideBySide:
  """The global training batches of ``NUM_PROCESSES`` processes, made in one process."""

  def __init__(self, config, mesh, start_step=0):
    local = config.batch_size // NUM_PROCESSES
    self._mesh = mesh
    self._streams = [
      pipeline.local_train_dataset(config, p, NUM_PROCESSES, local, start_step).as_numpy_iterator()
      for p in range(NUM_PROCESSES)
    ]

  def __iter__(self):
    return self

  def __next__(self):
    return parallel.shard_batch(_concatenate([next(s) for s in self._streams]), self._mesh)

  def close(self):
    pass


def _side_by_side_eval(config, mesh, split=None):
  parts = [
    pipeline.EvalIterable(config, mesh, split, process=(p, NUM_PROCESSES)).local_batches()
    for p in range(NUM_PROCESSES)
  ]
  return [parallel.shard_batch(_concatenate(batches), mesh) for batches in zip(*parts, strict=True)]


def _concatenate(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _env(process_id: int, port: int) -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  flags = re.sub(r'--xla_force_host_platform_device_count=\S*', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}'.strip()
  env.update(
    JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
    # jax binds the coordinator to every interface ([::]) by default; the test stays local.
    JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}',
    JAX_NUM_PROCESSES=str(NUM_PROCESSES),
    JAX_PROCESS_ID=str(process_id),
  )
  return env


class _TwoProcesses:
  """The two processes of one run, started at once; ``wait`` ends them (killed on timeout)."""

  def __init__(self, workdir, logs_dir, port):
    flags = [f'--config.{key}={value}' for key, value in OVERRIDES.items()]
    command = [
      sys.executable,
      '-m',
      'mixer_vit.main',
      '--multihost',
      f'--config={REPO}/configs/digits.py:vit',
      f'--workdir={workdir}',
      *flags,
    ]
    self.workdir = workdir
    self.deadline = time.monotonic() + TIMEOUT_S
    self.processes, self.logs = [], []
    try:
      for i in range(NUM_PROCESSES):
        self.logs.append(open(os.path.join(logs_dir, f'process{i}.log'), 'w+'))  # noqa: SIM115
        self.processes.append(
          subprocess.Popen(
            command,
            cwd=REPO,
            env=_env(i, port),
            stdout=self.logs[-1],
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Its own process group: killed as one in _stop.
          )
        )
    except BaseException:
      self._stop()
      raise

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self._stop()

  def _stop(self):
    for p in self.processes:
      if p.poll() is None:  # Not yet reaped, so its process group id is still its own.
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()

  def wait(self) -> list[tuple[int, str]]:
    """Exit codes and logs, once both ended, one failed or the time is up."""
    try:
      while time.monotonic() < self.deadline and any(p.poll() is None for p in self.processes):
        if any(p.poll() not in (None, 0) for p in self.processes):
          time.sleep(5)  # One failed: give the other a moment to log why, then stop it.
          break
        time.sleep(0.5)
    finally:
      self._stop()
    results = []
    for p, log in zip(self.processes, self.logs, strict=True):
      log.seek(0)
      results.append((p.returncode, log.read()))
      log.close()
    return results


def _start(tmp_path, attempt) -> _TwoProcesses:
  logs_dir = tmp_path / f'logs_{attempt}'
  logs_dir.mkdir()
  # Free when asked; another program may take it before the coordinator binds it: see the test.
  return _TwoProcesses(tmp_path / f'two_processes_{attempt}', logs_dir, _free_port())


def _describe(results) -> str:
  return '\n'.join(
    f'--- process {i}: exit code {code} (negative: killed, e.g. timeout) ---\n{log[-6000:]}'
    for i, (code, log) in enumerate(results)
  )


@pytest.mark.slow
def test_two_processes_of_four_devices_train_like_one_of_eight(tmp_path):
  config = _config()
  data.get_info(config)  # Prepares the digits set before two processes look for it at once.

  # The two processes train while the reference trains here (the machine's cores shared).
  with _start(tmp_path, 0) as run:
    single = tmp_path / 'one_process'
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(data, 'make_train_iterator', _SideBySide)
      patch.setattr(data, 'make_eval_iterator', _side_by_side_eval)
      train.train_and_evaluate(config, str(single))
    results = run.wait()
  if 'Failed to start RPC server' in results[0][1]:  # The port was taken after all: again.
    with _start(tmp_path, 1) as run:
      results = run.wait()
  multi = run.workdir
  assert all(code == 0 for code, _ in results), _describe(results)
  for i, (_, log) in enumerate(results):
    assert f'process {i} of {NUM_PROCESSES}, {LOCAL_DEVICES} local / 8 global devices' in log

  for name in (workdir_lib.CONFIG_FILE, workdir_lib.DATASET_INFO_FILE):
    assert (multi / name).read_text() == (single / name).read_text(), name
  multi_rows, single_rows = (
    metrics.read_jsonl(str(workdir / workdir_lib.METRICS_FILE)) for workdir in (multi, single)
  )
  assert [r['step'] for r in single_rows if 'loss' in r] == [5, 10, 15, 20]
  assert [sorted(r) for r in multi_rows] == [sorted(r) for r in single_rows]
  for got, want in zip(multi_rows, single_rows, strict=True):
    for key, value in want.items():
      if key == 'img_per_s':
        continue
      if 'accuracy' in key:  # A near-tie between two logits may flip one example.
        assert abs(got[key] - value) <= 1.01 / want['test_examples'], (got, want)
      elif isinstance(value, float):  # Observed: equal, or 1 float32 ulp apart.
        np.testing.assert_allclose(got[key], value, rtol=RTOL, err_msg=f'{key} {got} {want}')
      else:
        assert got[key] == value, (key, got, want)

  got = params_io.flatten(params_io.load_npz(multi / workdir_lib.PARAMS_FILE))
  want = params_io.flatten(params_io.load_npz(single / workdir_lib.PARAMS_FILE))
  assert got.keys() == want.keys()
  for key, value in want.items():
    atol = 1e-3 if key.endswith(NOISE_ONLY) else PARAMS_ATOL
    np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=atol, err_msg=key)
  # The processes' parts of the final checkpoint make the whole state (read here on 8 devices).
  restored = workdir_lib.load_workdir(str(multi))
  assert restored.step == 20
  restored_params = params_io.flatten(restored.params)
  for key, value in got.items():
    np.testing.assert_array_equal(restored_params[key], value, err_msg=key)
