"""Batching: exact evaluation, per-process shards, exact resume, independence of device count."""

import pathlib

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest
from sklearn.datasets import load_digits
import tensorflow as tf

from mixer_vit import data
from mixer_vit.runtime import parallel
from mixer_vit.training import config_utils

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'

PP_TRAIN = 'decode|inception_crop(8)|flip_lr|value_range(-1,1)|onehot'
PP_TEST = 'decode|resize(8)|value_range(-1,1)|onehot'


def _config(**kw):
  base = dict(
    dataset='digits',
    train_split='train',
    test_split='test',
    pp_train=PP_TRAIN,
    pp_test=PP_TEST,
    batch_size=64,
    eval_batch_size=64,
    seed=0,
  )
  base.update(kw)
  return base


def _mesh(num_devices):
  return parallel.make_mesh(jax.devices()[:num_devices])


def _numpy(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize('num_devices', [1, 8])
def test_eval_sees_every_example_once(num_devices):
  ev = data.make_eval_iterator(_config(), _mesh(num_devices))
  assert ev.num_examples == 299 and ev.num_batches == len(ev) == 5
  batches = [_numpy(b) for b in ev]
  assert len(batches) == 5
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.sum() == 299 and ev.last_count == 299
  assert masks[:299].all() and not masks[299:].any()
  # Padding rows are zeros; label counts over the masked rows are those of the split.
  labels = np.concatenate([b['labels'] for b in batches])
  assert not labels[~masks].any()
  np.testing.assert_array_equal(
    labels[masks].sum(0), np.bincount(load_digits().target[5::6], minlength=10)
  )
  assert batches[0]['image'].shape == (64, 8, 8, 3)


def test_eval_batches_equal_on_1_and_8_devices():
  one = [_numpy(b) for b in data.make_eval_iterator(_config(), _mesh(1))]
  eight_iter = data.make_eval_iterator(_config(), _mesh(8))
  eight = [_numpy(b) for b in eight_iter]
  assert len(one) == len(eight)
  for a, b in zip(one, eight):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  first = next(iter(eight_iter))
  assert len(first['image'].addressable_shards) == 8
  # A second pass gives the same again.
  np.testing.assert_array_equal(np.asarray(first['image']), one[0]['image'])


@pytest.mark.parametrize('count', [2, 3])
def test_eval_process_shards_disjoint_complete_and_aligned(count):
  config = _config(eval_batch_size=48)
  ids = []
  for p in range(count):
    ds = data.local_eval_dataset(config, p, count, 48 // count, with_ids=True)
    ids.append(np.concatenate([b['index'] for b in ds.as_numpy_iterator()]))
  flat = np.concatenate(ids)
  assert len(flat) == 299 and sorted(flat) == list(range(299))
  # Padded passes have the same number of batches in every process; masks add up.
  passes = [
    list(data.EvalIterable(config, _mesh(1), process=(p, count)).local_batches())
    for p in range(count)
  ]
  assert len({len(b) for b in passes}) == 1
  assert sum(b['mask'].sum() for batches in passes for b in batches) == 299


@pytest.mark.parametrize('count', [1, 3])
def test_train_process_shards_cover_each_epoch(count):
  config = _config()
  firsts = []
  for p in range(count):
    src = data.sources.open_source(data.DataConfig.from_config(config)).split('train')
    n = src.local_count(p, count)
    ds = data.local_train_dataset(config, p, count, 16, with_ids=True)
    ids = np.concatenate([b['index'] for b in ds.take(2 * n // 16 + 1).as_numpy_iterator()])
    assert len(set(ids[:n])) == n, 'an epoch visits each local example once'
    assert set(ids[n : 2 * n]) == set(ids[:n]) and not np.array_equal(ids[n : 2 * n], ids[:n])
    firsts.append(ids[:n])
  flat = np.concatenate(firsts)
  assert len(flat) == 1498 and len(set(flat)) == 1498


def test_resume_equals_uninterrupted_stream():
  config = _config(batch_size=128)
  mesh = _mesh(8)
  it = data.make_train_iterator(config, mesh)
  stream = [_numpy(next(it)) for _ in range(14)]  # 14 * 128 > 1498: crosses an epoch end.
  assert it.step == 14
  for start in (5, 11, 12):
    resumed = data.make_train_iterator(config, mesh, start_step=start)
    for step in range(start, 14):
      batch = _numpy(next(resumed))
      np.testing.assert_array_equal(batch['image'], stream[step]['image'], err_msg=f'{step}')
      np.testing.assert_array_equal(batch['labels'], stream[step]['labels'])
  # Random ops did act: the same example differs between epochs... and the seed matters.
  other = data.make_train_iterator(_config(batch_size=128, seed=1), mesh)
  assert not np.array_equal(_numpy(next(other))['image'], stream[0]['image'])


def test_train_batches_do_not_depend_on_device_count():
  config = _config(batch_size=64)
  one = data.make_train_iterator(config, _mesh(1))
  eight = data.make_train_iterator(config, _mesh(8))
  for _ in range(3):
    a, b = _numpy(next(one)), _numpy(next(eight))
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
  batch = next(eight)
  assert batch['image'].shape == (64, 8, 8, 3) and batch['image'].dtype == np.float32
  assert batch['labels'].shape == (64, 10)
  assert batch['image'].sharding == parallel.batch_sharding(_mesh(8))


def test_label_smoothing_in_batches():
  config = _config(pp_train='decode|value_range(-1,1)|onehot(smoothing=0.1)')
  labels = _numpy(next(data.make_train_iterator(config, _mesh(1))))['labels']
  np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(labels.max(-1), 0.91, rtol=1e-6)


def test_bad_configs_say_what_to_do():
  with pytest.raises(ValueError, match='multiple of 8'):
    data.make_train_iterator(_config(batch_size=12), _mesh(8))
  with pytest.raises(ValueError, match='evaluation must be deterministic'):
    list(data.make_eval_iterator(_config(pp_test=PP_TRAIN), _mesh(1)))
  with pytest.raises(ValueError, match='value_range'):
    next(data.make_train_iterator(_config(pp_train='decode|onehot'), _mesh(1)))
  with pytest.raises(ValueError, match='onehot'):
    next(data.make_train_iterator(_config(pp_train='decode|value_range'), _mesh(1)))
  with pytest.raises(ValueError, match='config.dataset'):
    data.get_info(_config(dataset=''))


def test_streamed_tfds_shards_and_resume():
  """Data sets over the memory limit are streamed from their files; same guarantees."""
  config = _config(in_memory_max_mb=0, shuffle_buffer=200)
  src = data.sources.open_source(data.DataConfig.from_config(config)).split('train')
  assert type(src).__name__ == 'StreamSplit'
  firsts = []
  for p in range(2):
    n = src.local_count(p, 2)
    ds = data.local_train_dataset(config, p, 2, 10, with_ids=True)
    ids = np.concatenate([b['index'] for b in ds.take(2 * n // 10 + 3).as_numpy_iterator()])
    assert len(set(ids[:n])) == n and set(ids[n : 2 * n]) == set(ids[:n])
    firsts.append(ids[:n])
    starts = (3, 20, 80) if p == 0 else ()  # in a block, at a block start, in the next epoch
    for start in starts:
      resumed = data.local_train_dataset(config, p, 2, 10, start_step=start, with_ids=True)
      got = np.concatenate([b['index'] for b in resumed.take(3).as_numpy_iterator()])
      np.testing.assert_array_equal(got, ids[start * 10 : start * 10 + 30])
  assert sorted(np.concatenate(firsts)) == list(range(1498))


def test_data_config_from_configdict_and_dict():
  config = config_utils.base_config()
  built = data.DataConfig.from_config(config)
  assert built == data.DataConfig.from_config(config.to_dict())
  assert data.DataConfig.from_config(built) is built
  assert (built.in_memory_max_mb, built.data_threads, built.device_prefetch) == (1024, 0, 2)
  assert (built.batch_size, built.eval_batch_size, built.data_dir) == (128, 256, None)
  assert built.max_image_pixels == config.max_image_pixels == 8000 * 8000
  # Missing optional keys take the defaults.
  assert data.DataConfig.from_config({'dataset': 'digits'}) == data.DataConfig(dataset='digits')
  small = data.DataConfig.from_config({'dataset': 'digits', 'batch_size': 8, 'eval_batch_size': 0})
  assert small.global_eval_batch_size == 8


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('dataset', '', 'config.dataset is not set'),
    ('batch_size', 0, r'config.batch_size must be an integer >= 1 \(the global batch size\)'),
    ('batch_size', 'many', 'config.batch_size must be an integer'),
    ('seed', 1.5, 'config.seed must be an integer'),
    ('skip_corrupt', 'yes', 'config.skip_corrupt must be True or False'),
    ('in_memory_max_mb', -1, 'config.in_memory_max_mb must be a number >= 0'),
    ('data_threads', -2, 'config.data_threads must be an integer >= 0'),
    ('max_image_pixels', -1, r'config.max_image_pixels must be an integer >= 0 \(decoded pixels'),
    ('pp_train', 3, 'config.pp_train must be a string'),
  ],
)
def test_data_config_bad_values_name_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    data.DataConfig.from_config(_config(**{key: value}))


def _parse_flags(*args):
  """The config as ``--config=FILE --config.KEY=VALUE`` on a command line gives it."""
  values = flags.FlagValues()
  argv = ['prog', *args]
  config_flags.DEFINE_config_file(
    'config', None, 'config', flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def test_config_file_takes_the_optional_data_keys(monkeypatch):
  config = _parse_flags(
    f'--config={CONFIG_DIR}/digits.py',
    '--config.in_memory_max_mb=0',
    '--config.data_threads=1',
    '--config.device_prefetch=3',
    '--config.batch_size=64',
    '--config.max_image_pixels=0',
  )
  assert (config.in_memory_max_mb, config.data_threads, config.device_prefetch) == (0, 1, 3)
  assert data.DataConfig.from_config(config).max_image_pixels == 0
  # The pipeline reads them: digits over the memory limit is streamed from its files, tf.data
  # gets one thread, and the first batch comes after 1 + 3 batches were put on the devices.
  split = data.sources.open_source(data.DataConfig.from_config(config)).split('train')
  assert type(split).__name__ == 'StreamSplit'
  ds = data.local_train_dataset(config, 0, 1, 64)
  assert ds.options().threading.private_threadpool_size == 1
  # Without autotuning (its iterator took 30+ s to release at the end of a run).
  assert ds.options().autotune.enabled is False
  sharded = []
  shard_batch = parallel.shard_batch
  monkeypatch.setattr(
    parallel, 'shard_batch', lambda batch, mesh: sharded.append(1) or shard_batch(batch, mesh)
  )
  it = data.make_train_iterator(config, _mesh(1))
  next(it)
  it.close()
  assert len(sharded) == 4


@pytest.mark.parametrize('process', [(0, 1), (1, 2)])
def test_block_shuffle_is_a_fresh_permutation_per_epoch_and_resumes_exactly(process):
  """Indices come in vectorised blocks with one key per epoch; the order is index_shuffle's."""
  p, count = process
  num = 2 * data.base.SHUFFLE_BLOCK + 5 * count + p  # Blocks do not divide an epoch.
  split = data.base.RandomAccessSplit(num, lambda i: {'image': i, 'label': i})
  n = split.local_count(p, count)
  stream = list(split.train_elements(p, count, 7, 0).take(3 * n).as_numpy_iterator())
  index = np.array([e['_index'] for e in stream])
  np.testing.assert_array_equal([e['_position'] for e in stream], np.arange(3 * n))
  epochs = index.reshape(3, n)
  for e in range(3):
    assert sorted(epochs[e]) == list(range(p, num, count)), f'epoch {e} is not a permutation'
    # The order of the per-example definition: offset q of epoch e -> index_shuffle(q, key(e)).
    key = data.base.shuffle_key(7, p, e)
    for q in (0, data.base.SHUFFLE_BLOCK, n - 1):
      local = tf.random.experimental.index_shuffle(tf.constant(q, tf.int64), key, n - 1)
      assert epochs[e, q] == p + count * int(local)
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  # Resuming anywhere (in a block, at a block start, at an epoch start, in a later epoch).
  for start in (3, data.base.SHUFFLE_BLOCK, n - 1, n, 2 * n + 17):
    tail = split.train_elements(p, count, 7, start).take(40)
    got = [(e['_index'], e['_position']) for e in tail.as_numpy_iterator()]
    want = [(e['_index'], e['_position']) for e in stream[start : start + 40]]
    assert got == want, start
  # The error path computes the same indices.
  positions = np.array([0, 5, n - 1, n, 2 * n + 3])
  np.testing.assert_array_equal(split.train_indices(p, count, 7, positions), index[positions])
  # Another seed, another order.
  other = split.train_elements(p, count, 8, 0).take(n).as_numpy_iterator()
  assert not np.array_equal([e['_index'] for e in other], epochs[0])


def test_split_streams_load_inside_the_preprocessing_map():
  """The source yields indices only; the image is gathered in the one per-example map."""
  config = data.DataConfig.from_config(_config())
  split = data.sources.open_source(config).split('train')
  element = next(split.train_elements(0, 1, 0, 0).as_numpy_iterator())
  assert set(element) == {'_index', '_position'}
  loaded = next(split.train_elements(0, 1, 0, 0).map(split.load).as_numpy_iterator())
  assert loaded['_index'] == element['_index'] and loaded['image'].shape == (8, 8, 1)
  batch = next(data.local_train_dataset(config, 0, 1, 4, with_ids=True).as_numpy_iterator())
  assert batch['index'][0] == element['_index']
