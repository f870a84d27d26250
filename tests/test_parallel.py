"""The mesh helpers: global batches assembled from per-process data, divisibility errors."""

import jax
import numpy as np
import pytest

from mixer_vit import parallel


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
