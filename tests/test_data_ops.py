"""The preprocessing ops, one by one, on single images (eager) as inference uses them."""

import inspect
import io
import struct
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mixer_vit.data import base
from mixer_vit.data import images
from mixer_vit.data import preprocess


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _run(pp, image, label=3, rng=None, num_classes=None):
  example = {'image': image, 'label': label}
  if rng is not None:
    example['_rng'] = np.asarray(rng, np.int64)
  out = preprocess.get_preprocess_fn(pp, num_classes=num_classes)(example)
  return {k: v.numpy() for k, v in out.items()}


def _random_image(h=20, w=30, c=3, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (h, w, c)).astype(np.uint8)


def test_parse_syntax_and_errors():
  assert preprocess.parse('decode|resize(8)|onehot(10, smoothing=0.1)') == [
    ('decode', (), {}),
    ('resize', (8,), {}),
    ('onehot', (10,), {'smoothing': 0.1}),
  ]
  with pytest.raises(ValueError, match="unknown preprocessing op 'nope'"):
    preprocess.parse('decode|nope')
  with pytest.raises(ValueError, match='cannot parse'):
    preprocess.parse('resize(8')
  with pytest.raises(ValueError, match='empty'):
    preprocess.parse('')
  with pytest.raises(ValueError, match="bad arguments for preprocessing op 'resize'"):
    preprocess.get_preprocess_fn('resize(1, 2, 3, 4, 5)')


def test_decode_grey_rgba_and_arrays_give_rgb():
  grey = _random_image(c=1)[..., 0]
  out = _run('decode', _png(grey))['image']
  assert out.shape == (20, 30, 3) and out.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], grey)
  rgba = _random_image(c=4)
  np.testing.assert_array_equal(_run('decode', _png(rgba))['image'], rgba[..., :3])
  # Already decoded arrays (tfds sets held in memory): only the channels change.
  np.testing.assert_array_equal(_run('decode', grey[..., None])['image'][..., 1], grey)
  np.testing.assert_array_equal(_run('grey_to_rgb', rgba)['image'], rgba[..., :3])


def test_ops_after_decode_need_decoded_images():
  with pytest.raises(ValueError, match="put 'decode' first"):
    _run('resize(8)', _png(_random_image()))


def test_value_range_is_the_checkpoint_formula():
  image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  out = _run('value_range(-1, 1)', image)['image']
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, (image.astype(np.float32) - 127.5) / 127.5)
  assert out.min() == -1 and out.max() == 1
  np.testing.assert_allclose(_run('value_range(0, 1)', image)['image'], image / 255, rtol=1e-6)


def test_resize_and_resize_small_and_central_crop():
  image = _random_image(40, 80)
  out = _run('resize(16)', image)['image']
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert _run('resize((10, 12))', image)['image'].shape == (10, 12, 3)
  flat = np.full((40, 80, 3), 77, np.uint8)
  np.testing.assert_array_equal(_run('resize(16)', flat)['image'], 77)
  assert _run('resize_small(20)', image)['image'].shape == (20, 40, 3)
  assert _run('resize_small(20)', image.transpose(1, 0, 2))['image'].shape == (40, 20, 3)
  np.testing.assert_array_equal(_run('central_crop(10)', image)['image'], image[15:25, 35:45])
  np.testing.assert_array_equal(_run('central_crop((4, 6))', image)['image'], image[18:22, 37:43])
  with pytest.raises(tf.errors.InvalidArgumentError, match='resize first'):
    _run('central_crop(50)', image)


def test_inception_crop_area_and_determinism():
  image = np.arange(100 * 100, dtype=np.int32).reshape(100, 100, 1)
  areas, outs = [], []
  for s in range(40):
    crop = _run('inception_crop', image, rng=[7, s])['image']
    areas.append(crop.shape[0] * crop.shape[1] / 100**2)
    outs.append(crop)
    # A crop is a contiguous window of the original image.
    top, left = divmod(int(crop[0, 0, 0]), 100)
    np.testing.assert_array_equal(
      crop, image[top : top + crop.shape[0], left : left + crop.shape[1]]
    )
  assert 0.05 <= min(areas) and max(areas) <= 1.0
  assert len({a for a in areas}) > 10, 'crops should vary with the seed'
  again = _run('inception_crop', image, rng=[7, 3])['image']
  np.testing.assert_array_equal(again, outs[3])
  resized = _run('decode|inception_crop(24)', _random_image(60, 50), rng=[1, 2])['image']
  assert resized.shape == (24, 24, 3) and resized.dtype == np.float32


def test_flip_lr_is_seeded():
  image = _random_image()
  flips = []
  for s in range(20):
    out = _run('flip_lr', image, rng=[0, s])['image']
    if np.array_equal(out, image[:, ::-1]):
      flips.append(True)
    else:
      np.testing.assert_array_equal(out, image)
      flips.append(False)
    np.testing.assert_array_equal(_run('flip_lr', image, rng=[0, s])['image'], out)
  assert 0 < sum(flips) < 20


def test_random_ops_draw_independent_seeds():
  # Two random ops in one string must not reuse one seed: their draws differ across examples.
  image = np.arange(64 * 64, dtype=np.int32).reshape(64, 64, 1)
  outs = {_run('inception_crop(8)|flip_lr', image, rng=[5, s])['image'].tobytes() for s in range(8)}
  assert len(outs) == 8


def test_random_ops_need_a_seed():
  with pytest.raises(ValueError, match='per-example seed'):
    _run('flip_lr', _random_image())
  assert not preprocess.is_deterministic('decode|inception_crop(8)|value_range')
  assert preprocess.is_deterministic('decode|resize(8)|central_crop(4)|value_range|onehot')


def test_onehot_and_label_smoothing():
  out = _run('onehot(5)', _random_image(), label=2)['labels']
  np.testing.assert_array_equal(out, [0, 0, 1, 0, 0])
  smooth = _run('onehot(smoothing=0.1)', _random_image(), label=4, num_classes=10)['labels']
  assert smooth.dtype == np.float32 and smooth.shape == (10,)
  np.testing.assert_allclose(smooth.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(smooth[4], 0.9 + 0.01, rtol=1e-6)
  np.testing.assert_allclose(smooth[0], 0.01, rtol=1e-6)
  with pytest.raises(ValueError, match='number of classes'):
    _run('onehot', _random_image())


def test_full_eval_string_on_one_encoded_image():
  out = _run(
    'decode|resize_small(36)|central_crop(32)|value_range(-1,1)|onehot(10)',
    _png(_random_image(48, 64)),
    label=1,
  )
  assert out['image'].shape == (32, 32, 3) and out['image'].dtype == np.float32
  assert -1 <= out['image'].min() and out['image'].max() <= 1
  assert set(out) == {'image', 'label', 'labels'}


def test_list_ops_marks_random_ops():
  ops = preprocess.list_ops()
  assert ops['flip_lr'].startswith('[random]') and not ops['resize'].startswith('[random]')


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_fused_jpeg_crop_matches_decode_then_crop(fmt):
  buf = io.BytesIO()
  Image.fromarray(_random_image(60, 80)).save(buf, format=fmt)
  for s in range(5):
    fused = _run('decode_jpeg_and_inception_crop(16)', buf.getvalue(), rng=[3, s])['image']
    plain = _run('decode|inception_crop(16)', buf.getvalue(), rng=[3, s])['image']
    assert fused.shape == plain.shape == (16, 16, 3)
    # Decoding only the window may round chroma upsampling at its border differently.
    assert np.abs(fused - plain).mean() < 2
    if fmt == 'PNG':
      np.testing.assert_array_equal(fused, plain)


def test_random_streams_are_pinned():
  """The exact crops and flips of given seeds: exact resume of a run relies on them never
  changing (the seed of each random op is split off the example's seed in the order of the ops).
  Values for TensorFlow 2.21's stateless random ops."""
  image = np.arange(100 * 100, dtype=np.int32).reshape(100, 100, 1)
  expected = {
    'inception_crop|flip_lr': [
      ((33, 30), 4260, 7489),
      ((69, 59), 1989, 8731),
      ((41, 46), 3213, 7258),
      ((87, 96), 402, 9097),
    ],
    'random_crop(10)|flip_lr': [
      ((10, 10), 3029, 3938),
      ((10, 10), 5540, 6431),
      ((10, 10), 8423, 9332),
      ((10, 10), 4816, 5725),
    ],
  }
  for pp, want in expected.items():
    got = []
    for s in range(4):
      out = _run(pp, image, rng=[7, s])['image']
      got.append((out.shape[:2], int(out[0, 0, 0]), int(out[-1, -1, 0])))
    assert got == want, pp


def test_image_op_decorator(monkeypatch):
  monkeypatch.setattr(preprocess, '_REGISTRY', dict(preprocess._REGISTRY))
  seeds = []

  @preprocess.image_op('test_shift', random=True)
  def test_shift(amount: int = 1):
    """Adds `amount` and records the seed."""

    def fn(image, seed):
      seeds.append(seed.numpy())
      return image + amount

    return fn

  assert preprocess.list_ops()['test_shift'] == '[random] Adds `amount` and records the seed.'
  image = _random_image().astype(np.int32)
  rng = np.asarray([4, 2], np.int64)
  # `key` is added as the last argument, positional or by keyword.
  fn = preprocess.get_preprocess_fn('test_shift(2, "mask")|test_shift(key="image")')
  out = fn({'image': image, 'mask': image, 'label': 0, '_rng': rng})
  np.testing.assert_array_equal(out['mask'], image + 2)
  np.testing.assert_array_equal(out['image'], image + 1)
  # Each random op gets the second half of the example's seed split in two; the first half is
  # the seed of the ops after it.
  first = tf.random.experimental.stateless_split(rng, 2)
  second = tf.random.experimental.stateless_split(first[0], 2)
  np.testing.assert_array_equal(seeds, [first[1].numpy(), second[1].numpy()])
  with pytest.raises(ValueError, match="op 'test_shift' got encoded image bytes in 'image'"):
    _run('test_shift', _png(_random_image()), rng=rng)
  with pytest.raises(ValueError, match="bad arguments for preprocessing op 'test_shift'"):
    preprocess.get_preprocess_fn('test_shift(1, "image", 3)')
  # The built-in ops take `key` the same way.
  resized = _run('resize(8, "bilinear", False, "image")', _random_image())['image']
  assert resized.shape == (8, 8, 3)


def test_size_arguments_are_checked():
  with pytest.raises(ValueError, match=r'size of central_crop must be an int or a pair of ints'):
    preprocess.get_preprocess_fn('central_crop((1, 2, 3))')
  with pytest.raises(ValueError, match=r'size of resize .* got \'big\''):
    preprocess.get_preprocess_fn("resize('big')")


# --------------------------------------------------------------------------------------------
# The limit on decoded pixels.


def _encoded(fmt: str, array: np.ndarray, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt, **kw)
  return buf.getvalue()


def _png_header(height: int, width: int) -> bytes:
  """The first bytes of a PNG that claims ``height`` x ``width`` (its pixel data missing)."""
  ihdr = b'IHDR' + struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + ihdr + struct.pack('>I', zlib.crc32(ihdr))


@pytest.mark.parametrize(
  'fmt,mode,kw',
  [
    ('JPEG', 'RGB', {}),
    ('JPEG', 'L', {'progressive': True}),
    ('PNG', 'RGBA', {}),
    ('PNG', 'L', {}),
    ('GIF', 'P', {}),
    ('BMP', 'RGB', {}),
    ('WEBP', 'RGB', {}),
    ('WEBP', 'RGB', {'lossless': True}),
    ('WEBP', 'RGBA', {'exif': b'Exif\0\0'}),  # The extended format (VP8X).
  ],
)
def test_header_size_is_the_decoded_size_without_decoding(fmt, mode, kw):
  for h, w in ((20, 30), (300, 7), (1, 1)):
    image = Image.fromarray(_random_image(h, w)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    data = buf.getvalue()
    assert tuple(images.header_size(data).numpy()) == (h, w), (fmt, kw, h, w)
    assert tf.io.decode_image(data, expand_animations=False).shape[:2] == (h, w)
  assert tuple(images.header_size(b'not an image').numpy()) == (0, 0)
  assert tuple(images.header_size(b'').numpy()) == (0, 0)


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_decode_refuses_images_over_max_pixels(fmt):
  data = _encoded(fmt, _random_image(20, 30))
  plain = _run('decode', data)['image']
  for pp in ('decode(max_pixels=600)', 'decode(max_pixels=0)', 'decode(3, 600)'):
    np.testing.assert_array_equal(_run(pp, data)['image'], plain)
  message = (
    r'^image of 20 x 30 = 600 pixels \(height x width\) is over the limit of 599 decoded '
    r'pixels \(a guard against decompression bombs\); raise the limit with '
    r'--config.max_image_pixels=N in training, or the op argument decode\(max_pixels=N\) in a '
    r'preprocessing string \(0: no limit\)$'
  )
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    _run('decode(max_pixels=599)', data)
  # The limit the pipeline passes applies to ops that do not set their own.
  with pytest.raises(tf.errors.InvalidArgumentError, match='over the limit of 599'):
    preprocess.get_preprocess_fn('decode', max_pixels=599)({'image': data})
  fn = preprocess.get_preprocess_fn('decode(max_pixels=0)', max_pixels=599)
  np.testing.assert_array_equal(fn({'image': data})['image'], plain)
  # Inside tf.data (a graph) the error says the same.
  ds = tf.data.Dataset.from_tensors({'image': data}).map(
    preprocess.get_preprocess_fn('decode', max_pixels=599)
  )
  with pytest.raises(tf.errors.InvalidArgumentError, match='image of 20 x 30 = 600 pixels'):
    list(ds)
  ds = tf.data.Dataset.from_tensors({'image': data}).map(
    preprocess.get_preprocess_fn('decode', max_pixels=600)
  )
  np.testing.assert_array_equal(next(iter(ds))['image'], plain)


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_fused_crop_refuses_images_over_max_pixels_and_is_unchanged_under(fmt):
  data = _encoded(fmt, _random_image(60, 80))
  name = 'decode_jpeg_and_inception_crop'
  for s in range(3):
    want = _run(f'{name}(16)', data, rng=[3, s])['image']
    got = _run(f'{name}(16, max_pixels=4800)', data, rng=[3, s])['image']
    np.testing.assert_array_equal(got, want)
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match=r'60 x 80 = 4800 pixels .* limit of 4799 .* decode_jpeg_and_inception_crop\(max_pixels',
  ):
    _run(f'{name}(16, max_pixels=4799)', data, rng=[3, 0])


def test_default_limit_is_8000_by_8000_and_checked_before_decoding():
  """Inference calls get_preprocess_fn(pp) without a limit: the ops' default applies."""
  assert base.DEFAULT_MAX_IMAGE_PIXELS == 64_000_000
  fn = preprocess.get_preprocess_fn('decode|resize(8)')
  # Only the header is there: decoding would fail otherwise, so the size check came first.
  with pytest.raises(tf.errors.InvalidArgumentError, match='8001 x 8000 = 64008000 pixels'):
    fn({'image': _png_header(8001, 8000)})
  with pytest.raises(tf.errors.InvalidArgumentError) as err:
    fn({'image': _png_header(8000, 8000)})  # Within the limit: decoded, and found truncated.
  assert 'over the limit' not in str(err.value)
  with pytest.raises(ValueError, match=r'decode needs max_pixels = an integer >= 0'):
    preprocess.get_preprocess_fn('decode(max_pixels=-1)')
  # Arrays already decoded are not checked.
  assert _run('decode(max_pixels=1)', _random_image(4, 4))['image'].shape == (4, 4, 3)


def test_pad_adds_a_border():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  out = _run('pad(2)', image)['image']
  assert out.shape == (6, 7, 3)
  np.testing.assert_array_equal(out[2:4, 2:5], image)
  assert out[:2].sum() == 0 and out[:, :2].sum() == 0
  np.testing.assert_array_equal(
    _run('pad((0, 1), mode="reflect")', image)['image'][:, 0], image[:, 1]
  )
  with pytest.raises(ValueError, match="pad\\(mode='wrap'\\)"):
    preprocess.get_preprocess_fn('pad(1, mode="wrap")')


def test_resize_before_value_range_skips_the_uint8_round_trip_with_the_same_values():
  image = _random_image(37, 53)
  image[:3] = 255  # Saturated rows: bicubic overshoots there, so its deferred rounding clips.
  image[-3:] = 0
  resize_ops = (
    'resize_small(20)',
    'resize((17, 23))',
    'resize_small(41, method="bicubic")',
    'resize((29, 61), method="lanczos3", antialias=True)',
    'resize_small(13, method="area")',
    'resize_small(19, antialias=True)',
  )
  for resize_op in resize_ops:
    # Op by op (uint8 in between) and composed (float32, rounded by value_range) agree exactly.
    resized = _run(resize_op, image)['image']
    assert resized.dtype == np.uint8
    for rest in ('central_crop(12)|value_range(-1,1)', 'flip_lr|pad(2)|value_range(0,1)'):
      rng = [1, 2]
      want = _run(rest, resized, rng=rng)['image']
      got = _run(f'{resize_op}|{rest}', image, rng=rng)['image']
      np.testing.assert_array_equal(got, want, err_msg=f'{resize_op}|{rest}')
  # The same inside tf.data (traced once, as the input pipeline runs it).
  fn = preprocess.get_preprocess_fn(
    'resize_small(41, method="bicubic")|central_crop(12)|value_range'
  )
  traced = next(iter(tf.data.Dataset.from_tensors({'image': image}).map(fn)))['image'].numpy()
  want = _run('central_crop(12)|value_range', _run(resize_ops[2], image)['image'])['image']
  np.testing.assert_array_equal(traced, want)
  # A float input is resized without rounding, composed or not.
  floats = image.astype(np.float32) / 7
  np.testing.assert_array_equal(
    _run('resize(9)|value_range(0,1)', floats)['image'],
    _run('value_range(0,1)', _run('resize(9)', floats)['image'])['image'],
  )
  ops = preprocess.parse('decode|resize_small(256)|central_crop(224)|value_range(-1,1)|onehot')
  assert preprocess._float_target(ops, 1) == 3  # pylint: disable=protected-access
  for pp in (
    'resize_small(8)|randaug|value_range',
    'resize(8)|central_crop(4)',
    'resize(8)|keep("image")|value_range',
  ):
    assert preprocess._float_target(preprocess.parse(pp), 0) is None, pp  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='leading underscore'):
    preprocess.parse('resize(8, _float_output=True)')
  assert '_float_output' not in str(inspect.signature(preprocess.resize_small))
