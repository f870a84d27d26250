"""RandAugment (Cubuk et al., 2020) on one image, with big_vision's / AugReg's conventions.

``preprocess`` registers it as the op ``randaug(num_layers=2, magnitude=10)``; this module holds
the image functions and knows nothing of examples or pp strings.

Conventions (big_vision's ``pp/autoaugment.py``, forked from the TPU EfficientNet code, which the
AugReg paper trained with; written anew here on TensorFlow ops, no tensorflow_addons):
- ``num_layers`` times, one op is picked uniformly from the list and always applied (big_vision
  draws an application probability but never uses it in RandAugment; timm applies each op with
  probability 1/2 instead).
- The ops (``BIG_VISION_OPS``, 16): AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize,
  Color, Contrast, Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Cutout,
  SolarizeAdd. ``ops='paper'`` takes the paper's 14 instead (``PAPER_OPS``: Identity and the
  first 13 above without Invert, Cutout and SolarizeAdd).
- The magnitude ``m`` is on the scale where 10 is the largest of the AutoAugment search
  (``MAX_LEVEL``); AugReg uses 0 (light1), 10, 15 and 20, and values over 10 extrapolate:
  Rotate ``30 m/10`` degrees, ShearX/Y ``0.3 m/10``, TranslateX/Y ``translate_const m/10`` pixels
  (100 at m = 10, meant for 224 px images), each with a random sign; Cutout a square of side
  ``2 int(cutout_const m/10)`` (``cutout_const`` 40) at a uniform centre; Color, Contrast,
  Brightness, Sharpness the factor ``1.8 m/10 + 0.1`` (1 leaves the image as it is, at m = 5; 0.1 at
  m = 0 is far from the identity); Posterize keeps ``int(4 m/10)`` bits (at least 1: TensorFlow's
  shift by 8 acts as one by 7, so big_vision's 0 bits are 1 bit); Solarize inverts pixels >=
  ``int(256 m/10)`` (all of them at m = 0, none from m = 10); SolarizeAdd adds ``int(110 m/10)``
  to pixels < 128. At m = 0, Rotate, Shear, Translate, Cutout and SolarizeAdd leave the image as it
  is; ``randaug(2, 0)`` still changes images (big_vision's config says so of AugReg's light1).
- Pixels that the geometric ops uncover, and Cutout's square, are grey (128); geometric ops use
  nearest-neighbour sampling. Results are truncated to uint8 like big_vision's ``blend``.
- One deviation: Contrast blends towards the mean grey level of the image (PIL's definition);
  big_vision's code blends towards (pixel count / 256), a known bug of the TPU code.

All randomness comes from the ``seed`` argument (stateless ops), so an image and a seed always
give the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = 128  # Grey: what geometric ops uncover and Cutout paints.

BIG_VISION_OPS = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'Posterize',
  'Solarize',
  'Color',
  'Contrast',
  'Brightness',
  'Sharpness',
  'ShearX',
  'ShearY',
  'TranslateX',
  'TranslateY',
  'Cutout',
  'SolarizeAdd',
)
PAPER_OPS = (
  'Identity',
  'AutoContrast',
  'Equalize',
  'Rotate',
  'Solarize',
  'Color',
  'Posterize',
  'Contrast',
  'Brightness',
  'Sharpness',
  'ShearX',
  'ShearY',
  'TranslateX',
  'TranslateY',
)
OP_SETS = {'big_vision': BIG_VISION_OPS, 'paper': PAPER_OPS}


# --------------------------------------------------------------------------------------------
# The image functions: uint8 (H, W, C) -> uint8 (H, W, C), C = 1 or 3.


def _grey(image: tf.Tensor) -> tf.Tensor:
  """float32 (H, W, 1) luma (ITU-R 601, as tf.image.rgb_to_grayscale) of a uint8 image."""
  image = tf.cast(image, tf.float32)
  if image.shape[-1] == 1:
    return image
  return tf.image.rgb_to_grayscale(image)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: float) -> tf.Tensor:
  """``degenerate + factor * (image - degenerate)``, clipped, truncated to uint8 (1: ``image``)."""
  if factor == 1.0:
    return image
  degenerate = tf.cast(degenerate, tf.float32)
  mixed = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def identity(image: tf.Tensor) -> tf.Tensor:
  return image


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel's [min, max] to [0, 255] (constant channels stay)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return tf.cast(tf.clip_by_value((x - offset) * scale, 0.0, 255.0), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize, per channel (one histogram of 256 bins per channel)."""
  c = image.shape[-1]
  values = tf.reshape(tf.cast(image, tf.int32), [-1, c])
  offsets = tf.range(c) * 256
  histogram = tf.reshape(tf.math.bincount(values + offsets, minlength=256 * c), [c, 256])
  # PIL's step leaves out the count of the highest value present.
  last = tf.gather(histogram, tf.reduce_max(values, axis=0), batch_dims=1)
  step = (tf.reduce_sum(histogram, axis=1) - last) // 255
  safe = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(histogram, axis=1) + safe // 2) // safe
  lut = tf.clip_by_value(tf.pad(lut[:, :-1], [[0, 0], [1, 0]]), 0, 255)
  mapped = tf.gather(tf.reshape(lut, [-1]), values + offsets)
  out = tf.where(step[None] > 0, mapped, values)
  return tf.reshape(tf.cast(out, tf.uint8), tf.shape(image))


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the ``bits`` (1..8) highest bits of each value."""
  shift = 8 - min(max(int(bits), 1), 8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  """Inverts the values >= ``threshold`` (any integer; >= 256: none)."""
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition: int, threshold: int = 128) -> tf.Tensor:
  """Adds ``addition`` to the values < ``threshold`` (clipped to 255)."""
  x = tf.cast(image, tf.int32)
  added = tf.cast(tf.clip_by_value(x + addition, 0, 255), tf.uint8)
  return tf.where(x < threshold, added, image)


def color(image: tf.Tensor, factor: float) -> tf.Tensor:
  """PIL's ImageEnhance.Color: towards (0) or away from the grey image."""
  if image.shape[-1] == 1:
    return image
  return blend(tf.cast(tf.image.grayscale_to_rgb(_grey(image)), tf.uint8), image, factor)


def contrast(image: tf.Tensor, factor: float) -> tf.Tensor:
  """PIL's ImageEnhance.Contrast: towards (0) or away from the mean grey level."""
  mean = tf.cast(tf.cast(tf.reduce_mean(_grey(image)) + 0.5, tf.uint8), tf.float32)
  return blend(tf.zeros_like(image, tf.float32) + mean, image, factor)


def brightness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """PIL's ImageEnhance.Brightness: towards (0) or away from black."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """PIL's ImageEnhance.Sharpness: towards (0) or away from PIL's SMOOTH filter (border kept)."""
  channels = image.shape[-1]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(
    tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], padding='VALID'
  )[0]
  smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
  inner = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  smooth = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return blend(smooth, image, factor)


def transform(image: tf.Tensor, matrix) -> tf.Tensor:
  """Projective transform: output (x, y) = input at ``matrix`` (a0 a1 a2 b0 b1 b2 c0 c1) applied
  to (x, y); nearest neighbour, uncovered pixels grey."""
  matrix = tf.reshape(tf.cast(tf.stack(matrix), tf.float32), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=matrix,
    output_shape=tf.shape(image)[:2],
    fill_value=float(FILL),
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )[0]
  out.set_shape(image.shape)
  return out


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Rotates by ``degrees`` about the centre (positive: counter-clockwise)."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  h = tf.cast(tf.shape(image)[0], tf.float32) - 1
  w = tf.cast(tf.shape(image)[1], tf.float32) - 1
  cos, sin = tf.cos(radians), tf.sin(radians)
  x_offset = (w - (cos * w - sin * h)) / 2
  y_offset = (h - (sin * w + cos * h)) / 2
  return transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def shear_x(image: tf.Tensor, level) -> tf.Tensor:
  return transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, level) -> tf.Tensor:
  return transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  return transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  return transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def cutout(image: tf.Tensor, pad_size: int, center_y, center_x) -> tf.Tensor:
  """Paints grey the square ``[c - pad_size, c + pad_size)`` (clipped) around the centre."""
  shape = tf.shape(image)
  rows = tf.range(shape[0])[:, None, None]
  cols = tf.range(shape[1])[None, :, None]
  inside = (
    (rows >= center_y - pad_size)
    & (rows < center_y + pad_size)
    & (cols >= center_x - pad_size)
    & (cols < center_x + pad_size)
  )
  return tf.where(inside, tf.constant(FILL, image.dtype), image)


# --------------------------------------------------------------------------------------------
# RandAugment.

# An op of the policy: (image, magnitude, random sign (+-1.), uniforms in [0, 1) (2,)) -> image.
_Op = Callable[[tf.Tensor, float, tf.Tensor, tf.Tensor, int, int], tf.Tensor]


def _level(magnitude: float, scale: float) -> float:
  return magnitude / MAX_LEVEL * scale


def _enhance(magnitude: float) -> float:
  return _level(magnitude, 1.8) + 0.1


def _cutout_op(image, m, sign, u, translate_const, cutout_const):
  del sign, translate_const
  shape = tf.shape(image)
  cy = tf.cast(u[0] * tf.cast(shape[0], tf.float32), tf.int32)
  cx = tf.cast(u[1] * tf.cast(shape[1], tf.float32), tf.int32)
  return cutout(image, int(_level(m, cutout_const)), cy, cx)


_OPS: dict[str, _Op] = {
  'Identity': lambda x, m, s, u, t, c: x,
  'AutoContrast': lambda x, m, s, u, t, c: auto_contrast(x),
  'Equalize': lambda x, m, s, u, t, c: equalize(x),
  'Invert': lambda x, m, s, u, t, c: invert(x),
  'Rotate': lambda x, m, s, u, t, c: rotate(x, s * _level(m, 30.0)),
  'Posterize': lambda x, m, s, u, t, c: posterize(x, int(_level(m, 4.0))),
  'Solarize': lambda x, m, s, u, t, c: solarize(x, int(_level(m, 256.0))),
  'SolarizeAdd': lambda x, m, s, u, t, c: solarize_add(x, int(_level(m, 110.0))),
  'Color': lambda x, m, s, u, t, c: color(x, _enhance(m)),
  'Contrast': lambda x, m, s, u, t, c: contrast(x, _enhance(m)),
  'Brightness': lambda x, m, s, u, t, c: brightness(x, _enhance(m)),
  'Sharpness': lambda x, m, s, u, t, c: sharpness(x, _enhance(m)),
  'ShearX': lambda x, m, s, u, t, c: shear_x(x, s * _level(m, 0.3)),
  'ShearY': lambda x, m, s, u, t, c: shear_y(x, s * _level(m, 0.3)),
  'TranslateX': lambda x, m, s, u, t, c: translate_x(x, s * _level(m, t)),
  'TranslateY': lambda x, m, s, u, t, c: translate_y(x, s * _level(m, t)),
  'Cutout': _cutout_op,
}
OP_NAMES = tuple(_OPS)


def op_names(ops: str | Sequence[str]) -> tuple[str, ...]:
  """The op list of ``ops``: 'big_vision', 'paper', or a sequence of op names (checked)."""
  if isinstance(ops, str):
    if ops not in OP_SETS:
      raise ValueError(
        f'randaug ops={ops!r}: use {" or ".join(map(repr, OP_SETS))}, or a tuple of op names '
        f'from {", ".join(OP_NAMES)}'
      )
    return OP_SETS[ops]
  names = tuple(ops)
  unknown = [n for n in names if n not in _OPS]
  if unknown or not names:
    raise ValueError(
      f'randaug ops={ops!r}: unknown or no op names {unknown}; known: {", ".join(OP_NAMES)}'
    )
  return names


def apply_op(
  image: tf.Tensor,
  name: str,
  magnitude: float,
  sign: float | tf.Tensor = 1.0,
  uniforms=(0.5, 0.5),
  translate_const: float = 100,
  cutout_const: float = 40,
) -> tf.Tensor:
  """One op of the policy on a uint8 image, its random parts given (for tests and pictures)."""
  return _OPS[name](
    image,
    float(magnitude),
    tf.constant(sign, tf.float32),
    tf.constant(uniforms, tf.float32),
    translate_const,
    cutout_const,
  )


def distort(
  image: tf.Tensor,
  seed: tf.Tensor,
  num_layers: int = 2,
  magnitude: float = 10,
  ops: str | Sequence[str] = 'big_vision',
  translate_const: float = 100,
  cutout_const: float = 40,
) -> tf.Tensor:
  """RandAugment: ``num_layers`` ops drawn from ``ops`` with ``seed`` (shape [2]), in order.

  ``image``: uint8 (H, W, 1 or 3); other dtypes (e.g. inception_crop's float32 in [0, 255]) are
  rounded and clipped to uint8 first and cast back at the end.
  """
  names = op_names(ops)
  dtype = image.dtype
  if image.shape.rank == 3 and image.shape[-1] is None:
    image = tf.ensure_shape(image, [None, None, 3])
  if image.shape.rank != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'randaug needs an (H, W, 1 or 3) image, got shape {image.shape}')
  x = image
  if dtype != tf.uint8:
    x = tf.cast(tf.clip_by_value(tf.round(tf.cast(x, tf.float32)), 0, 255), tf.uint8)
  if num_layers == 0:
    return image
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num_layers)
  shape = x.shape

  def layer(i, x):  # One loop body: the ops are traced once, whatever num_layers is.
    u = tf.random.stateless_uniform([4], seeds[i])
    index = tf.minimum(tf.cast(u[0] * len(names), tf.int32), len(names) - 1)
    sign = tf.where(u[1] < 0.5, -1.0, 1.0)

    def branch(name):
      return lambda: _OPS[name](x, magnitude, sign, u[2:], translate_const, cutout_const)

    x = tf.switch_case(index, [branch(name) for name in names])
    x.set_shape(shape)
    return i + 1, x

  _, x = tf.while_loop(
    lambda i, _: i < num_layers,
    layer,
    (tf.constant(0), x),
    shape_invariants=(tf.TensorShape([]), shape),
    parallel_iterations=1,
  )
  return x if dtype == tf.uint8 else tf.cast(x, dtype)
