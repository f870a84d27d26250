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

import numpy as np
import tensorflow as tf

from mixer_vit.data import base

_HEADER_BYTES = 32


# (height, width) of each non-JPEG format as fields of its first bytes: (offset, length, endian).
_FIELDS = (
  ((20, 4, 'big'), (16, 4, 'big')),  # PNG IHDR: width, height.
  ((8, 2, 'little'), (6, 2, 'little')),  # GIF logical screen (the decoded frame size).
  ((22, 4, 'little'), (18, 4, 'little')),  # BMP, signed (negative: top-down), as TF reads it.
  ((28, 2, 'little'), (26, 2, 'little')),  # Lossy WebP (VP8): 14 bits each.
  ((21, 4, 'little'), (21, 4, 'little')),  # Lossless WebP (VP8L): 14 bits width-1, then height-1.
  ((27, 3, 'little'), (24, 3, 'little')),  # Extended WebP (VP8X): the canvas, minus one.
)
_MAGIC = (
  (b'\x89PNG', 0),
  (b'GIF8', 0),
  (b'BM', 0),
  (b'RIFF', 0, b'WEBPVP8 ', 8),
  (b'RIFF', 0, b'WEBPVP8L', 8),
  (b'RIFF', 0, b'WEBPVP8X', 8),
)
# Per field (format, then height / width): value // div % mod + add; BMP's are signed.
_DIV = np.array((1,) * 8 + (1 << 14,) + (1,) * 3, np.int64)
_MOD = np.array((1 << 40,) * 6 + (1 << 14,) * 4 + (1 << 40,) * 2, np.int64)
_ADD = np.array((0,) * 8 + (1,) * 4, np.int64)
_SIGNED = np.array((False,) * 4 + (True, True) + (False,) * 6)


def _tables():
  """Gather indices and weights (fields x 4 bytes); magic patterns and masks (formats x 16)."""
  index = np.zeros((12, 4), np.int64)
  weight = np.zeros((12, 4), np.int64)
  for row, (start, count, endian) in enumerate(f for pair in _FIELDS for f in pair):
    for i in range(count):
      index[row, i] = start + i
      weight[row, i] = 1 << (8 * (i if endian == 'little' else count - 1 - i))
  pattern = np.zeros((len(_MAGIC), 16), np.int64)
  mask = np.zeros((len(_MAGIC), 16), bool)
  for row, parts in enumerate(_MAGIC):
    for text, start in zip(parts[::2], parts[1::2]):
      pattern[row, start : start + len(text)] = list(text)
      mask[row, start : start + len(text)] = True
  return index, weight, pattern, mask


_INDEX, _WEIGHT, _PATTERN, _PATTERN_MASK = _tables()


def _other_header_size(encoded: tf.Tensor) -> tf.Tensor:
  """(height, width) int64 of a PNG, GIF, BMP or WebP from its first bytes; (0, 0) otherwise.

  Vectorised over the formats (about 20 ops, not one per byte): in tf.data a ``tf.cond`` is
  lowered so that even its branch not taken costs a little per op, and the 100-odd scalar ops
  of a per-byte version cost more than a JPEG's whole header read.
  """
  head = tf.strings.substr(encoded, 0, _HEADER_BYTES) + b'\0' * _HEADER_BYTES
  head = tf.strings.substr(head, 0, _HEADER_BYTES)
  b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
  value = tf.reduce_sum(tf.gather(b, _INDEX) * _WEIGHT, axis=1)
  value = tf.abs(tf.where(_SIGNED & (value >= 2**31), value - 2**32, value))
  value = tf.reshape(value // _DIV % _MOD + _ADD, [len(_MAGIC), 2])
  match = tf.reduce_all(tf.equal(b[:16], _PATTERN) | ~_PATTERN_MASK, axis=1)
  size = tf.gather(value, tf.argmax(tf.cast(match, tf.int32)))
  return tf.where(tf.reduce_any(match), size, tf.zeros([2], tf.int64))


def header_size(encoded: tf.Tensor) -> tf.Tensor:
  """(height, width) int64 of an encoded JPEG, PNG, GIF, BMP or WebP from its header.

  Nothing is decoded. (0, 0) for other data (which ``tf.io.decode_image`` refuses anyway); a
  corrupt JPEG header raises the error decoding would raise.
  """
  encoded = tf.convert_to_tensor(encoded, tf.string)
  return tf.cond(
    tf.io.is_jpeg(encoded),
    lambda: tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64),
    lambda: _other_header_size(encoded),
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

  def too_large():  # The message is formatted only for an image over the limit.
    template = too_large_message('{}', '{}', '{}', max_pixels, op)
    message = tf.strings.format(template, (height, width, height * width))
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
      return tf.identity(encoded)

  return tf.cond(height * width <= max_pixels, lambda: tf.identity(encoded), too_large)


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
