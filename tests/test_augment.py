"""RandAugment (the op randaug) and mixup / CutMix of training batches."""

import pathlib

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from mixer_vit import data
from mixer_vit.data import mix
from mixer_vit.data import preprocess
from mixer_vit.data import randaug
from mixer_vit.runtime import parallel
from mixer_vit.training import config_utils

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def _photo(size=24, seed=0):
  """A smooth colour image with some structure (random noise makes blends trivial)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:size, :size] / size
  channels = [np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)]
  image = 100 + 80 * np.stack(channels, -1) + rng.normal(0, 10, (size, size, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def _op(image, name, magnitude, **kw):
  return randaug.apply_op(tf.constant(image), name, magnitude, **kw).numpy()


def test_randaug_is_seeded_and_keeps_shape_and_dtype():
  fn = preprocess.get_preprocess_fn('randaug(2, 15)')
  image = _photo()
  run = lambda img, seed: fn({'image': img, '_rng': np.array([seed, 7])})['image'].numpy()
  outs = [run(image, s) for s in range(8)]
  assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
  np.testing.assert_array_equal(run(image, 3), outs[3])
  assert len({o.tobytes() for o in outs}) >= 6, 'different seeds give different images'
  assert sum(not np.array_equal(o, image) for o in outs) >= 6
  # inception_crop's float32 in [0, 255]: rounded for the ops, given back as float32.
  as_float = fn({'image': image.astype(np.float32) + 0.2, '_rng': np.array([3, 7])})['image']
  assert as_float.dtype == tf.float32
  np.testing.assert_array_equal(as_float.numpy(), outs[3].astype(np.float32))


def test_randaug_ops_at_neutral_magnitudes_are_the_identity():
  image = _photo()
  np.testing.assert_array_equal(_op(image, 'Identity', 10), image)
  for name in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout'):
    np.testing.assert_array_equal(_op(image, name, 0), image, err_msg=name)
    assert not np.array_equal(_op(image, name, 10, translate_const=5), image), name
  np.testing.assert_array_equal(_op(image, 'SolarizeAdd', 0), image)
  for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):  # Factor 1.8 m/10 + 0.1 = 1.
    np.testing.assert_array_equal(_op(image, name, 5), image, err_msg=name)
    assert not np.array_equal(_op(image, name, 10), image), name
  np.testing.assert_array_equal(_op(image, 'Solarize', 10), image)  # Threshold 256.
  np.testing.assert_array_equal(_op(image, 'Posterize', 20), image)  # 8 bits.
  # big_vision's magnitude 0 is not "nothing" for these (AugReg's light1 = randaug(2, 0)):
  np.testing.assert_array_equal(_op(image, 'Solarize', 0), 255 - image)
  np.testing.assert_array_equal(_op(image, 'Posterize', 0), image & 0x80)


def test_randaug_ops_match_pil():
  image = _photo(seed=1)
  pil = Image.fromarray(image)
  exact = {
    'AutoContrast': ImageOps.autocontrast(pil),
    'Equalize': ImageOps.equalize(pil),
    'Invert': ImageOps.invert(pil),
    'Posterize': ImageOps.posterize(pil, 2),  # int(4 * 5 / 10) bits.
    'Solarize': ImageOps.solarize(pil, 128),  # int(256 * 5 / 10).
  }
  for name, want in exact.items():
    np.testing.assert_array_equal(_op(image, name, 5), np.asarray(want), err_msg=name)
  enhance = {
    'Color': ImageEnhance.Color,
    'Contrast': ImageEnhance.Contrast,
    'Brightness': ImageEnhance.Brightness,
    'Sharpness': ImageEnhance.Sharpness,
  }
  for name, enhancer in enhance.items():
    for magnitude in (2, 9):
      want = np.asarray(enhancer(pil).enhance(1.8 * magnitude / 10 + 0.1)).astype(int)
      got = _op(image, name, magnitude).astype(int)
      assert np.abs(got - want).max() <= 2, (name, magnitude)  # PIL rounds, big_vision truncates.
  # Geometry: a translation by 3 pixels moves the content and uncovers grey.
  moved = _op(image, 'TranslateX', 10, translate_const=3)
  np.testing.assert_array_equal(moved[:, :-3], image[:, 3:])
  assert (moved[:, -3:] == randaug.FILL).all()
  corner = _op(image, 'Cutout', 1, uniforms=(0.0, 0.0), cutout_const=40)  # Pad 4 at (0, 0).
  assert (corner[:4, :4] == 128).all() and np.array_equal(corner[4:], image[4:])


def test_randaug_bad_arguments_name_them():
  for pp, match in (
    ('randaug(-1)', 'num_layers'),
    ("randaug(2, 'x')", 'magnitude'),
    ("randaug(ops=('Rotate', 'Blur'))", 'Blur'),
    ("randaug(ops='timm')", 'big_vision'),
  ):
    with pytest.raises(ValueError, match=match):
      preprocess.get_preprocess_fn(pp)


def _batch(size=6, hw=5, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.eye(classes, dtype=np.float32)[np.arange(size) % classes] * 0.9 + 0.1 / classes
  images = rng.uniform(-1, 1, (size, hw, hw, 3)).astype(np.float32)
  return {'image': tf.constant(images), 'labels': tf.constant(labels)}, images, labels


def test_mixup_and_cutmix_mix_images_and_labels_with_the_same_weight():
  batch, x, y = _batch()
  partner_x, partner_y = np.roll(x, -1, 0), np.roll(y, -1, 0)
  mixup, cutmix = data.base.MixOption(1.0, 0.4), data.base.MixOption(1.0, 1.0)
  kinds = set()
  for step in range(6):
    key = mix.batch_key(0, 0, step)
    for option in ('mixup', 'cutmix'):
      out = mix.mix_batch(dict(batch), key, **{option: mixup if option == 'mixup' else cutmix})
      images, labels = out['image'].numpy(), out['labels'].numpy()
      np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
      # Labels lam * y + (1 - lam) * y_next; y_i and y_{i+1} differ, so lam is readable.
      row = np.flatnonzero(y[:, 0] != partner_y[:, 0])[0]
      lam = (labels[row, 0] - partner_y[row, 0]) / (y[row, 0] - partner_y[row, 0])
      np.testing.assert_allclose(labels, lam * y + (1 - lam) * partner_y, atol=1e-6)
      if option == 'mixup':
        np.testing.assert_allclose(images, lam * x + (1 - lam) * partner_x, atol=1e-6)
      else:  # Every pixel is its own or its partner's; the partner's share is 1 - lam.
        mine = np.all(images == x, -1)
        theirs = np.all(images == partner_x, -1)
        assert (mine | theirs).all() and (mine[0] == mine).all(), 'one box for the batch'
        np.testing.assert_allclose(theirs[0].mean(), 1 - lam, atol=1e-6)
      kinds.add((option, bool(0 < lam < 1)))
  assert ('mixup', True) in kinds and ('cutmix', True) in kinds


def _config(**kw):
  base = dict(
    dataset='digits',
    pp_train="decode|flip_lr|randaug(2, 9, ops=('Rotate', 'Solarize', 'Cutout'))|value_range|onehot",
    pp_test='decode|value_range(-1,1)|onehot',
    batch_size=32,
    eval_batch_size=64,
    mixup={'p': 0.3, 'alpha': 0.5},
    cutmix={'p': 0.3, 'alpha': 1.0},
  )
  base.update(kw)
  return base


def _mesh(n):
  return parallel.make_mesh(jax.devices()[:n])


def _take(config, mesh, steps, start=0):
  it = data.make_train_iterator(config, mesh, start_step=start)
  batches = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(steps)]
  it.close()
  return batches


def test_mixed_batches_resume_exactly_and_do_not_depend_on_device_count():
  config = _config()
  stream = _take(config, _mesh(8), 6)
  for batch in stream:
    np.testing.assert_allclose(batch['labels'].sum(-1), 1.0, rtol=1e-5)
  soft = [((b['labels'] > 0) & (b['labels'] < 1)).any() for b in stream]
  assert soft == [True, False, True, False, True, True], 'seed 0: mixup, -, mixup, -, cutmix x2'
  for got, want in zip(_take(config, _mesh(8), 2, start=4), stream[4:]):
    for key in ('image', 'labels'):
      np.testing.assert_array_equal(got[key], want[key])
  for got, want in zip(_take(config, _mesh(1), 3), stream):
    for key in ('image', 'labels'):
      np.testing.assert_array_equal(got[key], want[key])
  plain = _take(_config(mixup=None, cutmix={'p': 0.0}), _mesh(1), 6)
  for got, want, mixed in zip(plain, stream, soft):
    assert np.array_equal(got['image'], want['image']) != mixed
  # Evaluation is never mixed.
  first = lambda c: next(data.local_eval_dataset(c, 0, 1, 64).as_numpy_iterator())
  plain_eval, mixed_eval = first(_config(mixup=None)), first(config)
  for key in ('image', 'labels'):
    np.testing.assert_array_equal(mixed_eval[key], plain_eval[key])


@pytest.mark.parametrize(
  'mixup, cutmix, message',
  [
    ({'p': 0.5}, None, 'mixup.alpha is not set'),
    ({'alpha': 0.2, 'prob': 1}, None, r"unknown keys \['prob'\]"),
    ({'p': 1.5, 'alpha': 0.2}, None, r'mixup.p must be a probability'),
    ({'p': 0.5, 'alpha': 0}, None, 'mixup.alpha must be > 0'),
    ({'p': 0.7, 'alpha': 0.2}, {'p': 0.5, 'alpha': 1.0}, r'mixup.p \+ config.cutmix.p'),
    (None, 0.5, 'config.cutmix must be a dict'),
  ],
)
def test_bad_mix_configs_name_the_key(mixup, cutmix, message):
  with pytest.raises(ValueError, match=message):
    data.DataConfig.from_config(_config(mixup=mixup, cutmix=cutmix))


def test_base_config_mixes_nothing_and_takes_overrides():
  config = config_utils.base_config()
  assert not data.DataConfig.from_config(config).mixes
  values = flags.FlagValues()
  argv = ['prog', f'--config={CONFIG_DIR}/digits.py', '--config.cutmix.p=0.5']
  config_flags.DEFINE_config_file('config', None, 'c', flag_values=values, sys_argv=argv)
  values(argv)
  assert data.DataConfig.from_config(values.config).cutmix == data.base.MixOption(0.5, 1.0)
  config.mixup.p = 1.0
  config.cutmix = {'alpha': 1.0, 'p': 0}
  parsed = data.DataConfig.from_config(config)
  assert parsed.mixup == data.base.MixOption(1.0, 0.2) and parsed.cutmix is None
