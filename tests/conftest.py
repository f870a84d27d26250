"""Test set-up: 8 fake CPU devices, a private tfds data dir, no network, real data located."""

import os
import pathlib
import socket
import tempfile

# Must happen before jax / tensorflow are imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# The 8 fake devices are 8 threads of one process. Before each all-reduce XLA waits for all of
# them, and aborts the process when one is more than 40 s late (its default). On 2 cores shared
# with the other pytest worker a thread can fall that far behind in a large step, so the tests
# wait up to 10 minutes, as a real multi-device run would.
for _flag in (
  '--xla_cpu_collective_call_terminate_timeout_seconds=600',
  '--xla_cpu_collective_call_warn_stuck_timeout_seconds=120',
):
  if _flag.split('=')[0] not in os.environ['XLA_FLAGS']:
    os.environ['XLA_FLAGS'] += ' ' + _flag
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# A private tfds folder per process, pytest-xdist workers included (two writers of one folder
# would race); a TFDS_DATA_DIR set by the user is kept.
_owner = os.environ.get('MIXER_VIT_TEST_TFDS_OWNER')
if 'TFDS_DATA_DIR' not in os.environ or (_owner and _owner != str(os.getpid())):
  os.environ['TFDS_DATA_DIR'] = tempfile.mkdtemp(prefix='mixer_vit_tfds_')
  os.environ['MIXER_VIT_TEST_TFDS_OWNER'] = str(os.getpid())
os.environ.setdefault('MPLBACKEND', 'Agg')

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get('MIXER_VIT_DATA', REPO_ROOT.parent / 'shared' / 'data'))


def _is_local(address) -> bool:
  if isinstance(address, (str, bytes)):  # AF_UNIX
    return True
  host = str(address[0])
  return host in ('localhost', '::1', '0.0.0.0', '') or host.startswith('127.')


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded(real):
  def connect(self, address):
    if not _is_local(address):
      raise OSError(f'tests must not use the network (tried to connect to {address!r})')
    return real(self, address)

  return connect


socket.socket.connect = _guarded(_real_connect)
socket.socket.connect_ex = _guarded(_real_connect_ex)


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """The real-data folder (MNIST, CIFAR-10, ImageNet class names); skips when it is absent."""
  if not (SHARED_DATA / 'README.md').exists():
    pytest.skip(f'real data folder not found at {SHARED_DATA}; set MIXER_VIT_DATA to its path')
  return SHARED_DATA
