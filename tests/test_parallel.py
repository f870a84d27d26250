"""The mesh helpers: global batches assembled from per-process data, divisibility errors."""

import jax
import numpy as np
import pytest

from mixer_vit.runtime import parallel


def test_eight_fake_devices():
  assert jax.device_count() == 8, 'conftest should give 8 CPU devices'


@pytest.mark.parametrize('num_devices', [1, 8])
def test_shard_batch_is_global_and_split(num_devices):
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  local = {'image': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  assert parallel.process_batch_size(16, mesh) == 16
  batch = parallel.shard_batch(local, mesh)
  assert batch['image'].shape == (16, 3)
  np.testing.assert_array_equal(np.asarray(batch['image']), local['image'])
  assert len(batch['image'].addressable_shards) == num_devices
  assert batch['image'].addressable_shards[0].data.shape == (16 // num_devices, 3)


def test_indivisible_batch_says_what_to_do():
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match='multiple of 8'):
    parallel.process_batch_size(12, mesh)


def test_initialize_distributed_reads_the_process_count_and_id(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  monkeypatch.setenv('MIXER_VIT_MULTIHOST', '0')
  parallel.maybe_initialize_distributed()
  assert calls == []  # Off unless asked for.
  parallel.maybe_initialize_distributed(True)
  assert calls == [{'num_processes': 2, 'process_id': 1}]
  monkeypatch.setenv('MIXER_VIT_MULTIHOST', '1')
  monkeypatch.delenv('JAX_PROCESS_ID')
  parallel.maybe_initialize_distributed()
  assert calls[-1] == {'num_processes': 2}  # The id then comes from jax's cluster detection.
