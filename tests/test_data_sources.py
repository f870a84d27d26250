"""Data sources: bundled digits, tfds look-up without network, image folders, MNIST idx files."""

import gzip
import os
import re
import struct
import tarfile
import time

import jax
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds

from mixer_vit import data
from mixer_vit.data import digits
from mixer_vit.data import folder
from mixer_vit.data import mnist_idx
from mixer_vit.data import sources
from mixer_vit.data import tfds_source
from mixer_vit.runtime import parallel

PP = 'decode|value_range(-1,1)|onehot'


def _config(**kw):
  base = dict(
    dataset='digits',
    train_split='train',
    test_split='test',
    pp_train=PP,
    pp_test=PP,
    batch_size=8,
    eval_batch_size=8,
    seed=0,
  )
  base.update(kw)
  return base


def _open(config):
  return sources.open_source(data.DataConfig.from_config(config))


def _all_eval(config, split=None):
  """(images, labels, split indices) of one evaluation pass in a single process."""
  batches = list(
    data.local_eval_dataset(config, 0, 1, 64, split=split, with_ids=True).as_numpy_iterator()
  )
  return (
    np.concatenate([b['image'] for b in batches]),
    np.concatenate([b['labels'] for b in batches]).argmax(-1),
    np.concatenate([b['index'] for b in batches]),
  )


# --------------------------------------------------------------------------------------------
# Bundled digits and tfds.


def test_digits_builds_offline_with_fixed_split(tmp_path):
  start = time.time()
  info = data.get_info(_config(data_dir=str(tmp_path)))
  assert time.time() - start < 30
  assert info.num_examples == {'train': digits.NUM_TRAIN, 'test': digits.NUM_TEST}
  assert (digits.NUM_TRAIN, digits.NUM_TEST) == (1498, 299)
  assert info.num_classes == 10 and info.class_names == [str(i) for i in range(10)]
  assert info.image_shape == (8, 8, 1)
  assert (tmp_path / 'digits' / '1.0.0' / 'dataset_info.json').exists()
  # The test split is every 6th scikit-learn image: its labels match scikit-learn's.
  target = load_digits().target
  images, labels, index = _all_eval(_config(data_dir=str(tmp_path)))
  assert images.shape == (299, 8, 8, 3)
  np.testing.assert_array_equal(
    np.bincount(labels, minlength=10), np.bincount(target[5::6], minlength=10)
  )
  assert sorted(index) == list(range(299))


def test_prepared_tfds_set_found_by_version_and_reused(tmp_path):
  path = digits.prepare(str(tmp_path))
  mtime = os.path.getmtime(os.path.join(path, 'dataset_info.json'))
  assert tfds_source.find_prepared('digits', str(tmp_path)) == path
  assert tfds_source.find_prepared('digits:1.0.0', str(tmp_path)) == path
  assert tfds_source.find_prepared('digits:9.9.9', str(tmp_path)) is None
  assert tfds_source.find_prepared('mnist', str(tmp_path)) is None
  digits.prepare(str(tmp_path))
  assert os.path.getmtime(os.path.join(path, 'dataset_info.json')) == mtime


@pytest.mark.parametrize('name', ['cifar10', 'mnist', 'imagenet2012'])
def test_not_prepared_without_network_fails_fast_and_says_how(tmp_path, name):
  start = time.time()
  with pytest.raises(data.NotPreparedError) as err:
    data.get_info(_config(dataset=name, data_dir=str(tmp_path)))
  assert time.time() - start < 10, "must not wait for tfds's download retries"
  message = str(err.value)
  assert f'tfds build {name} --data_dir={tmp_path}' in message
  assert str(tmp_path) in message
  assert not isinstance(err.value, data.UnknownDatasetError) and 'unknown' not in message
  if name == 'mnist':
    assert 'python -m mixer_vit.data.mnist_idx --idx_dir=' in message


def test_misspelled_tfds_name_is_unknown_and_the_closest_names_are_suggested(tmp_path, monkeypatch):
  monkeypatch.setattr(
    tfds_source, 'network_reachable', lambda *a: pytest.fail('no network probe for a typo')
  )
  (tmp_path / 'my_flowers' / '1.0.0').mkdir(parents=True)  # A data set prepared in data_dir.
  for name, suggested in [
    ('cifr10', "'cifar10'"),
    ('CIFAR10', "'cifar10'"),
    ('mnsit', "'mnist'"),
    ('digit', "'digits'"),
    ('my_flower', "'my_flowers'"),
    ('cifr10/plain:1.0.0', "'cifar10'"),
  ]:
    start = time.time()
    with pytest.raises(data.UnknownDatasetError) as err:
      data.get_info(_config(dataset=name, data_dir=str(tmp_path)))
    assert time.time() - start < 2
    message = str(err.value)
    assert message.startswith(
      f'unknown data set {name!r}: tfds has no data set named {name.split("/")[0]!r} and '
      f'data_dir {str(tmp_path)!r} has no prepared copy of it. Did you mean '
    ), message
    assert '\n' not in message and suggested in message.split('Did you mean ')[1], message
    assert 'given as a path: --config.dataset=/path/to/ROOT' in message
    assert 'tfds build' not in message
  with pytest.raises(data.UnknownDatasetError, match='No known name is close; python -c'):
    data.get_info(_config(dataset='qqqqqqqqqqqq', data_dir=str(tmp_path)))


def test_stream_split_used_when_over_the_memory_limit(tmp_path):
  config = _config(data_dir=str(tmp_path), in_memory_max_mb=0)
  split = _open(config).split('test')
  assert type(split).__name__ == 'StreamSplit'
  images, labels, index = _all_eval(config)
  in_memory = _all_eval(_config(data_dir=str(tmp_path)))
  np.testing.assert_array_equal(index, in_memory[2])
  np.testing.assert_array_equal(images, in_memory[0])
  np.testing.assert_array_equal(labels, in_memory[1])


# --------------------------------------------------------------------------------------------
# Image folders.


def _make_folder(root, corrupt=False):
  """ROOT/{train,test}/{ant,bee,cat}: RGB JPEGs, grey PNGs, RGBA PNGs (and a corrupt JPEG)."""
  rng = np.random.RandomState(0)
  expected = {}  # relative path -> (RGB array for lossless files or None, label)
  for split, per_class in (('train', 4), ('test', 2)):
    for label, cls in enumerate(['ant', 'bee', 'cat']):
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(per_class):
        kind = i % 3
        if kind == 0:
          Image.fromarray(rng.randint(0, 256, (12, 10, 3)).astype(np.uint8)).save(
            d / f'{i}.jpg', quality=95
          )
          expected[f'{split}/{cls}/{i}.jpg'] = (None, label)
        elif kind == 1:
          grey = rng.randint(0, 256, (12, 10)).astype(np.uint8)
          Image.fromarray(grey, mode='L').save(d / f'{i}.png')
          expected[f'{split}/{cls}/{i}.png'] = (np.repeat(grey[..., None], 3, -1), label)
        else:
          rgba = rng.randint(0, 256, (12, 10, 4)).astype(np.uint8)
          Image.fromarray(rgba, mode='RGBA').save(d / f'{i}.png')
          expected[f'{split}/{cls}/{i}.png'] = (rgba[..., :3], label)
  (root / 'train' / 'bee' / 'notes.txt').write_text('not an image')
  if corrupt:
    (root / 'train' / 'cat' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
  return expected


@pytest.mark.parametrize('in_memory_max_mb', [1024, 0])  # decoded in memory / read from disk
def test_folder_classes_grey_and_rgba(tmp_path, in_memory_max_mb):
  expected = _make_folder(tmp_path)
  config = _config(dataset=str(tmp_path), in_memory_max_mb=in_memory_max_mb)
  info = data.get_info(config)
  assert info.class_names == ['ant', 'bee', 'cat'] and info.num_classes == 3
  assert info.num_examples == {'train': 12, 'test': 6}
  src = _open(config)
  for split in ('train', 'test'):
    images, labels, index = _all_eval(config, split)
    files = src._files_of(split)  # pylint: disable=protected-access
    assert sorted(index) == list(range(len(files)))
    for image, label, i in zip(images, labels, index):
      rel = os.path.relpath(files[i][0], tmp_path)
      want, want_label = expected[rel]
      assert label == want_label, rel
      assert image.shape == (12, 10, 3)
      if want is not None:
        np.testing.assert_array_equal(np.round(image * 127.5 + 127.5).astype(np.uint8), want)


def test_folder_split_slices_are_disjoint_and_cover(tmp_path):
  _make_folder(tmp_path)
  config = _config(dataset=str(tmp_path))
  src = _open(config)
  whole = [f for f, _ in src._files_of('train')]  # pylint: disable=protected-access
  head = [f for f, _ in src._files_of('train[:75%]')]  # pylint: disable=protected-access
  tail = [f for f, _ in src._files_of('train[75%:]')]  # pylint: disable=protected-access
  assert len(head) == 9 and head + tail == whole
  assert src.num_examples('train[:2]+test[-1:]') == 3
  with pytest.raises(ValueError, match='not found in image folder'):
    src.num_examples('validation')


def test_folder_corrupt_file_is_named(tmp_path):
  _make_folder(tmp_path, corrupt=True)
  config = _config(dataset=str(tmp_path), test_split='train')
  assert data.get_info(config).num_examples['train'] == 13
  with pytest.raises(data.CorruptImageError, match=r'broken\.jpg.*skip_corrupt=True'):
    list(data.make_eval_iterator(config, _mesh1()))
  with pytest.raises(data.CorruptImageError, match=r'broken\.jpg'):
    it = data.make_train_iterator(config, _mesh1())
    for _ in range(10):  # 13 examples, batch 8: the corrupt one comes within two steps.
      next(it)


@pytest.mark.parametrize('in_memory_max_mb', [1024, 0])  # in memory / read from disk
def test_folder_image_over_max_image_pixels_is_named(tmp_path, in_memory_max_mb, caplog):
  _make_folder(tmp_path)
  huge = tmp_path / 'train' / 'cat' / 'huge.png'
  Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(huge)
  config = _config(
    dataset=str(tmp_path),
    test_split='train',
    in_memory_max_mb=in_memory_max_mb,
    max_image_pixels=1000,  # The others are 12 x 10.
  )
  assert data.get_info(config).num_examples['train'] == 13
  message = (
    rf'cannot decode image file\(s\): {re.escape(str(huge))} \(image of 40 x 30 = 1200 pixels '
    r'\(height x width\) is over the limit of 1000 decoded pixels .*'
    r'--config.max_image_pixels=N .*skip_corrupt=True'
  )
  with pytest.raises(data.CorruptImageError, match=message):
    list(data.make_eval_iterator(config, _mesh1()))
  with pytest.raises(data.CorruptImageError, match=r'huge\.png \(image of 40 x 30'):
    it = data.make_train_iterator(config, _mesh1())
    for _ in range(10):
      next(it)
  # Within the limit (or with none) it is read like the others.
  resized = {**config, 'pp_test': 'decode|resize((12, 10))|value_range(-1, 1)|onehot'}
  for limit in (1200, 0):
    images, _, _ = _all_eval({**resized, 'max_image_pixels': limit})
    assert len(images) == 13
  # skip_corrupt leaves it out.
  with caplog.at_level('WARNING'):
    skipping = {**config, 'skip_corrupt': True}
    assert data.get_info(skipping).num_examples['train'] == 12
  assert 'over max_image_pixels=1000' in caplog.text and 'huge.png' in caplog.text


def test_folder_skip_corrupt_leaves_it_out_and_logs(tmp_path, caplog):
  _make_folder(tmp_path, corrupt=True)
  config = _config(dataset=str(tmp_path), test_split='train', skip_corrupt=True)
  with caplog.at_level('WARNING'):
    assert data.get_info(config).num_examples['train'] == 12
  assert 'skipped 1 corrupt image file(s)' in caplog.text and 'broken.jpg' in caplog.text
  masks = [np.asarray(b['mask']) for b in data.make_eval_iterator(config, _mesh1())]
  assert sum(m.sum() for m in masks) == 12


def test_folder_missing_gives_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.get_info(_config(dataset=str(tmp_path / 'nope')))


def _mesh1():
  return parallel.make_mesh(jax.devices()[:1])


# --------------------------------------------------------------------------------------------
# MNIST from idx files.


def _write_idx(path, array):
  if array.ndim == 3:
    header = struct.pack('>IIII', 0x803, *array.shape)
  else:
    header = struct.pack('>II', 0x801, len(array))
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_prepared_from_idx_files_works_offline(tmp_path):
  rng = np.random.RandomState(0)
  idx_dir = tmp_path / 'idx'
  idx_dir.mkdir()
  arrays = {}
  for split, n in (('train', 30), ('test', 12)):
    images = rng.randint(0, 256, (n, 28, 28))
    labels = np.arange(n) % 10
    _write_idx(idx_dir / f'{mnist_idx.FILES[split][0]}.gz', images)
    _write_idx(idx_dir / f'{mnist_idx.FILES[split][1]}.gz', labels)
    arrays[split] = (images, labels)
  data_dir = tmp_path / 'tfds'
  mnist_idx.main([f'--idx_dir={idx_dir}', f'--data_dir={data_dir}'])
  config = _config(dataset='mnist', data_dir=str(data_dir))
  info = data.get_info(config)
  assert info.num_examples == {'train': 30, 'test': 12} and info.num_classes == 10
  # Same features as tfds's own mnist builder.
  reference = tfds.image_classification.MNIST(data_dir=str(tmp_path / 'ref')).info.features
  prepared = tfds.builder_from_directory(str(data_dir / 'mnist' / '3.0.1')).info.features
  assert repr(prepared) == repr(reference)
  images, labels, _ = _all_eval(config)
  want_images, want_labels = arrays['test']
  got = sorted(
    zip(
      labels.tolist(), np.round(images[..., 0] * 127.5 + 127.5).astype(int).reshape(12, -1).tolist()
    )
  )
  want = sorted(zip(want_labels.tolist(), want_images.reshape(12, -1).tolist()))
  assert got == want


def test_mnist_idx_bad_input_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match='train-images-idx3-ubyte'):
    mnist_idx.prepare(str(tmp_path), str(tmp_path / 'tfds'))
  (tmp_path / 'bad').write_bytes(struct.pack('>II', 0x1234, 0))
  with pytest.raises(ValueError, match='not an idx file'):
    mnist_idx.read_idx(str(tmp_path / 'bad'))


def test_real_mnist_idx_files_parse(shared_data):
  images, labels = mnist_idx.read_split(str(shared_data / 'mnist'), 'test')
  assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
  assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # The well-known first test labels.
  train_images, train_labels = mnist_idx.read_split(str(shared_data / 'mnist'), 'train')
  assert train_images.shape == (60000, 28, 28)
  assert np.bincount(train_labels).tolist()[:2] == [5923, 6742]


def test_real_cifar10_folder_subset(shared_data, tmp_path):
  """A few CIFAR-10 JPEGs per class from the shared tarball, read as an image folder."""
  taken = {}
  with tarfile.open(shared_data / 'cifar10-jpeg.tar.gz') as tar:
    for member in tar:
      parts = member.name.lstrip('./').split('/')
      if not member.isfile() or len(parts) != 3:
        continue
      key = (parts[0], parts[1])
      if taken.get(key, 0) < (3 if parts[0] == 'train' else 1):
        taken[key] = taken.get(key, 0) + 1
        tar.extract(member, tmp_path, filter='data')
      if len(taken) == 20 and sum(taken.values()) == 40:
        break
  config = _config(dataset=str(tmp_path))
  info = data.get_info(config)
  assert info.class_names == [
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
  ]
  assert info.num_examples == {'train': 30, 'test': 10}
  images, labels, _ = _all_eval(config)
  assert images.shape == (10, 32, 32, 3) and sorted(labels) == list(range(10))


def test_folder_split_parser():
  assert folder.parse_split('train[:98%]') == [('train', '', '98%')]
  assert folder.parse_split('train[10:-5]+test') == [('train', '10', '-5'), ('test', '', '')]
  with pytest.raises(ValueError, match='cannot parse split'):
    folder.parse_split('train[::2]')


def _jpeg_folder(root, sizes):
  """ROOT/train/{a,b}/i.jpg with image i of ``sizes[i]``."""
  rng = np.random.RandomState(0)
  for i, (h, w) in enumerate(sizes):
    d = root / 'train' / 'ab'[i % 2]
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(d / f'{i}.jpg')


def test_folder_of_one_size_is_decoded_once_into_memory(tmp_path, caplog):
  _jpeg_folder(tmp_path, [(12, 10)] * 6)
  with caplog.at_level('INFO'):
    split = folder.ImageFolder(str(tmp_path)).split('train')
  kind, stored, _ = split.storage
  assert kind == 'memory' and stored.dtype == np.uint8 and stored.shape == (6, 12, 10, 3)
  assert 'Decoded 6 images of shape (12, 10, 3)' in caplog.text
  assert 'different sizes' not in caplog.text


def test_folder_of_mixed_sizes_says_so_from_the_headers(tmp_path, caplog, monkeypatch):
  _jpeg_folder(tmp_path, [(12, 10), (14, 9)] * 3)
  decoded = []
  decode = folder.images.decode
  monkeypatch.setattr(folder.images, 'decode', lambda *a, **k: decoded.append(1) or decode(*a, **k))
  with caplog.at_level('INFO'):
    split = folder.ImageFolder(str(tmp_path)).split('train')
  assert not decoded, 'the sizes come from the headers; nothing is decoded'
  kind, stored, _ = split.storage
  assert kind == 'memory' and stored.dtype == object  # Kept encoded.
  message = (
    rf"image folder '{re.escape(str(tmp_path))}', split 'train': images of different sizes "
    r'\(\S+\.jpg is (12x10|14x9), \S+\.jpg is (12x10|14x9)\); the 6 files stay encoded'
  )
  assert re.search(message, caplog.text), caplog.text
  assert 'Local rendezvous' not in caplog.text and 'Decoded' not in caplog.text


def test_folder_size_mismatch_outside_the_header_sample_is_named(tmp_path, caplog):
  _jpeg_folder(tmp_path, [(12, 10)] * 40)
  source = folder.ImageFolder(str(tmp_path))
  files = [f for f, _ in source._files_of('train')]  # pylint: disable=protected-access
  sample = set(np.linspace(0, 39, folder._HEADER_SAMPLE).astype(int))  # pylint: disable=protected-access
  odd = files[min(set(range(40)) - sample)]
  Image.fromarray(np.zeros((7, 5, 3), np.uint8)).save(odd, format='JPEG')
  with caplog.at_level('INFO'):
    split = source.split('train')
  assert split.storage[1].dtype == object
  assert f'different sizes ({odd} is not 12x10 like {files[0]})' in caplog.text
  # Still readable, at every step.
  batch = next(
    data.local_eval_dataset(
      _config(dataset=str(tmp_path), pp_test='decode|resize(4)|value_range(-1,1)|onehot'),
      0,
      1,
      40,
      split='train',
    ).as_numpy_iterator()
  )
  assert batch['image'].shape == (40, 4, 4, 3)
