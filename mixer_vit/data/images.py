"""Encoded images: their size read from the header, and decoding under a limit on pixels.

A small file can hold a huge image (a 12000 x 12000 JPEG decodes to 430 MB of uint8 RGB, and
resizing it to float32 takes gigabytes). ``decode`` therefore reads the height and width from the
file's header first (JPEG: ``tf.io.extract_jpeg_shape``; PNG, GIF, BMP and WebP: the header
bytes) and refuses images with more than ``max_pixels`` pixels (height x width; 0 or None: no
limit), in the spirit of Pillow's decompression-bomb guard. The error gives the image's size, the
limit and how to raise it. Images within the limit decode exactly as ``tf.io.decode_image``.

Everything is written with TensorFlow ops, so it runs inside ``tf.data`` (the error is then an
``InvalidArgumentError`` raised by the iterator) and eagerly on one image (a one-line
``InvalidArgumentError``).
"""

from __future__ import annotations

import tensorflow as tf

from mixer_vit.data import base

_HEADER_BYTES = 32


def _le(b: tf.Tensor, start: int, count: int) -> tf.Tensor:
  """The little-endian unsigned integer in ``b[start:start + count]`` (int64 bytes)."""
  return sum(b[start + i] * (1 << (8 * i)) for i in range(count))


def _be(b: tf.Tensor, start: int, count: int) -> tf.Tensor:
  """The big-endian unsigned integer in ``b[start:start + count]`` (int64 bytes)."""
  return sum(b[start + i] * (1 << (8 * (count - 1 - i))) for i in range(count))


def _signed32(value: tf.Tensor) -> tf.Tensor:
  return tf.where(value >= 2**31, value - 2**32, value)


def header_size(encoded: tf.Tensor) -> tf.Tensor:
  """(height, width) int64 of an encoded JPEG, PNG, GIF, BMP or WebP from its header.

  Nothing is decoded. (0, 0) for other data (which ``tf.io.decode_image`` refuses anyway); a
  corrupt JPEG header raises the error decoding would raise.
  """
  encoded = tf.convert_to_tensor(encoded, tf.string)
  head = tf.strings.substr(encoded, 0, _HEADER_BYTES) + b'\0' * _HEADER_BYTES
  head = tf.strings.substr(head, 0, _HEADER_BYTES)
  b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
  magic = lambda text: tf.equal(tf.strings.substr(head, 0, len(text)), text)
  riff = tf.strings.substr(head, 8, 8)

  png = (_be(b, 20, 4), _be(b, 16, 4))  # IHDR: width, height.
  gif = (_le(b, 8, 2), _le(b, 6, 2))  # Logical screen: width, height (the decoded frame size).
  bmp = (tf.abs(_signed32(_le(b, 22, 4))), tf.abs(_signed32(_le(b, 18, 4))))  # As TF reads it.
  vp8 = (_le(b, 28, 2) % (1 << 14), _le(b, 26, 2) % (1 << 14))  # Lossy WebP.
  vp8l_bits = _le(b, 21, 4)  # Lossless WebP: 14 bits width - 1, 14 bits height - 1.
  vp8l = (vp8l_bits // (1 << 14) % (1 << 14) + 1, vp8l_bits % (1 << 14) + 1)
  vp8x = (_le(b, 27, 3) + 1, _le(b, 24, 3) + 1)  # Extended WebP: the canvas.

  cases = [
    (magic(b'\x89PNG'), png),
    (magic(b'GIF8'), gif),
    (magic(b'BM'), bmp),
    (magic(b'RIFF') & tf.equal(riff, b'WEBPVP8 '), vp8),
    (magic(b'RIFF') & tf.equal(riff, b'WEBPVP8L'), vp8l),
    (magic(b'RIFF') & tf.equal(riff, b'WEBPVP8X'), vp8x),
  ]
  size = tf.zeros([2], tf.int64)
  for condition, (height, width) in reversed(cases):
    size = tf.where(condition, tf.stack([height, width]), size)
  return tf.cond(
    tf.io.is_jpeg(encoded),
    lambda: tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64),
    lambda: size,
  )


def too_large_message(height, width, pixels, max_pixels: int, op: str = 'decode') -> str:
  """The error text for an image of ``height`` x ``width`` = ``pixels`` over ``max_pixels``."""
  return (
    f'image of {height} x {width} = {pixels} pixels (height x width) is over the limit of '
    f'{max_pixels} decoded pixels (a guard against decompression bombs); raise the limit with '
    f'--config.max_image_pixels=N in training, or the op argument {op}(max_pixels=N) in a '
    'preprocessing string (0: no limit)'
  )


def check_pixels(encoded: tf.Tensor, max_pixels: int | None, op: str = 'decode') -> tf.Tensor:
  """``encoded``, after checking that its image has at most ``max_pixels`` pixels (0/None: any).

  Eagerly the check raises at once; in a graph (tf.data) the returned tensor depends on it.
  """
  if not max_pixels:
    return encoded
  max_pixels = int(max_pixels)
  size = header_size(encoded)
  if tf.executing_eagerly():
    height, width = (int(v) for v in size.numpy())
    if height * width > max_pixels:
      raise tf.errors.InvalidArgumentError(
        None, None, too_large_message(height, width, height * width, max_pixels, op)
      )
    return encoded
  height, width = size[0], size[1]
  template = too_large_message('{}', '{}', '{}', max_pixels, op)
  message = tf.strings.format(template, (height, width, height * width))
  within = height * width <= max_pixels
  with tf.control_dependencies([tf.debugging.Assert(within, [message])]):
    return tf.identity(encoded)


def decode(
  encoded: tf.Tensor,
  channels: int = 3,
  max_pixels: int | None = base.DEFAULT_MAX_IMAGE_PIXELS,
  op: str = 'decode',
) -> tf.Tensor:
  """``tf.io.decode_image`` (first frame, ``channels``) of an image within ``max_pixels``."""
  encoded = check_pixels(encoded, max_pixels, op)
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image
