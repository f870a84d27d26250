"""Preprocessing ops, composed from strings like ``'decode|resize(256)|central_crop(224)'``.

Each op is a small function from an example dict to an example dict, written with TensorFlow ops
so it runs inside ``tf.data`` and, unchanged, eagerly on a single image (inference).

Syntax: ops are separated by ``|``; an op is ``name`` or ``name(args)`` with Python literal
arguments, positional or by keyword: ``onehot(10, smoothing=0.1)``, ``resize((224, 160))``.

Random ops (``inception_crop``, ``flip_lr``, ``randaug``) are stateless: they draw from the
per-example seed ``example['_rng']`` (shape [2], int64), which the input pipeline derives from the
run's seed and the example's position in the stream. The same seed and position always give the
same output, which is what makes resuming a run exact.

``randaug(num_layers=2, magnitude=10)`` is RandAugment with big_vision's / AugReg's ops and
magnitudes (the module ``randaug`` states them); it works on uint8 values (inception_crop's float32
is rounded first and given back as float32), so put it before ``value_range``:
``decode|inception_crop(224)|flip_lr|randaug(2, 15)|value_range(-1, 1)|onehot``.

Writing an op: most ops change one image, and are written as a factory that takes the op's
arguments and returns a function ``image -> image`` (random ops: ``(image, seed) -> image``);
``@image_op(name)`` registers it and does the rest (the ``key`` argument, the check that the
image is decoded, the seed)::

  @image_op('flip_ud', random=True)
  def flip_ud():
    return lambda image, seed: tf.image.stateless_random_flip_up_down(image, seed)

(the factory's docstring, first line, is the op's description in ``list_ops()``).

Ops on other entries (``onehot``, ``keep``) are factories of ``example -> example`` functions,
registered with ``@register(name)``.

``resize`` and ``resize_small`` keep the input's dtype (uint8 results are rounded), like
big_vision's ops; when ``value_range`` follows through crops, flips or pads only, the rounding
moves there, onto the pixels that remain (the same values, less work). ``inception_crop(size)``
returns float32 values in [0, 255], not rounded back (half again faster on the training path,
where the crop is random anyway); ``value_range`` then maps either to [-1, 1].

The decoding ops (``decode``, ``decode_jpeg_and_inception_crop``) refuse encoded images with more
than ``max_pixels`` pixels (height x width; default 8000 x 8000, 0: no limit) before decoding
them, reading the size from the file's header (see ``images``); the training pipeline passes
``config.max_image_pixels`` to those that do not set it.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
import dataclasses
import functools
import inspect
import threading
from typing import Any

import tensorflow as tf

from mixer_vit.data import base
from mixer_vit.data import images
from mixer_vit.data import randaug as randaug_lib
from mixer_vit.runtime import sizes

Example = dict[str, Any]
OpFn = Callable[[Example], Example]

RNG_KEY = '_rng'


@dataclasses.dataclass(frozen=True)
class _OpSpec:
  factory: Callable[..., OpFn]
  random: bool
  doc: str


_REGISTRY: dict[str, _OpSpec] = {}


def register(name: str, random: bool = False):
  """Registers an op factory under ``name`` (``random=True``: it consumes ``example['_rng']``)."""

  def wrap(factory):
    _REGISTRY[name] = _OpSpec(factory, random, (factory.__doc__ or '').strip().split('\n')[0])
    return factory

  return wrap


def image_op(name: str, random: bool = False, decoded: bool = True):
  """Registers an op written on one image: ``factory(*args) -> fn``, ``fn(image) -> image``.

  The registered factory takes the factory's arguments plus a last one, ``key='image'`` (the
  example entry the op reads and replaces), and returns the op ``example -> example``, which:
  - with ``decoded=True``, refuses encoded image bytes (asking for ``decode`` first);
  - with ``random=True``, splits the example's seed ``example['_rng']`` in two, keeps the first
    half as the example's new seed and calls ``fn(image, seed)`` with the second. Each random op
    of a pp string thus gets its own seed, in the order of the ops.
  """

  def wrap(factory: Callable[..., Callable[..., tf.Tensor]]) -> Callable[..., OpFn]:
    signature = inspect.signature(factory)
    key_param = inspect.Parameter(
      'key', inspect.Parameter.POSITIONAL_OR_KEYWORD, default='image', annotation='str'
    )
    public = [p for p in signature.parameters.values() if not p.name.startswith('_')]
    signature = signature.replace(parameters=[*public, key_param], return_annotation='OpFn')

    @functools.wraps(factory)
    def make(*args, **kwargs) -> OpFn:
      # Keyword-only ``_name`` parameters are set by ``get_preprocess_fn``, never by pp strings.
      private = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith('_')}
      arguments = signature.bind(*args, **kwargs)  # TypeError for bad arguments.
      key = arguments.arguments.pop('key', 'image')
      fn = factory(*arguments.args, **arguments.kwargs, **private)

      def op(data: Example) -> Example:
        image = data[key]
        if decoded and image.dtype == tf.string:
          raise ValueError(
            f"op {name!r} got encoded image bytes in {key!r}; put 'decode' first in the "
            'preprocessing string'
          )
        data[key] = fn(image, _next_seed(data, name)) if random else fn(image)
        return data

      return op

    make.__signature__ = signature
    register(name, random)(make)
    return make

  return wrap


def list_ops() -> dict[str, str]:
  """Op name -> one-line description (random ops are marked)."""
  return {
    name: ('[random] ' if spec.random else '') + spec.doc
    for name, spec in sorted(_REGISTRY.items())
  }


# --------------------------------------------------------------------------------------------
# Parsing.


def parse(pp: str) -> list[tuple[str, tuple, dict]]:
  """Splits a pp string into ``(name, args, kwargs)`` triples; errors name the bad part."""
  if not isinstance(pp, str) or not pp.strip():
    raise ValueError(f"empty preprocessing string {pp!r}; e.g. 'decode|value_range(-1,1)|onehot'")
  ops = []
  for part in pp.split('|'):
    part = part.strip()
    try:
      call = ast.parse(part, mode='eval').body
      if isinstance(call, ast.Name):
        name, args, kwargs = call.id, (), {}
      elif isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
        name = call.func.id
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        if any(k is None or k.startswith('_') for k in kwargs):
          raise ValueError('keyword arguments must be named, without a leading underscore')
      else:
        raise ValueError('not an op call')
    except (SyntaxError, ValueError) as e:
      raise ValueError(
        f'cannot parse preprocessing op {part!r} in {pp!r} ({e}); ops look like '
        "'name' or 'name(literal args)', separated by '|'"
      ) from None
    if name not in _REGISTRY:
      raise ValueError(
        f'unknown preprocessing op {name!r} in {pp!r}; known ops: {", ".join(sorted(_REGISTRY))}'
      )
    ops.append((name, args, kwargs))
  return ops


def is_deterministic(pp: str) -> bool:
  """True when no op of ``pp`` is random (evaluation requires this)."""
  return not any(_REGISTRY[name].random for name, _, _ in parse(pp))


def get_preprocess_fn(
  pp: str, num_classes: int | None = None, max_pixels: int | None = None
) -> Callable[[Mapping], Example]:
  """Composes the ops of ``pp`` into one function ``example dict -> example dict``.

  Args:
    pp: the preprocessing string.
    num_classes: the class count that ``onehot`` without an explicit count uses.
    max_pixels: the limit on decoded pixels (height x width) of the decoding ops that do not set
      ``max_pixels`` themselves (0: no limit; None: the ops' default, 8000 x 8000).

  Returns:
    A function usable in ``tf.data.Dataset.map`` or eagerly on one example, e.g.
    ``fn({'image': uint8 HWC array or encoded bytes, 'label': 3})``. Keys starting with ``_``
    (the per-example seed) are dropped from the result.
  """
  fns = []
  ops = parse(pp)
  deferred = {}  # value_range's index -> the rounding its resize leaves to it.
  for i, (name, args, kwargs) in enumerate(ops):
    target = _float_target(ops, i) if name in _FLOAT_OUTPUT_OPS else None
    if target is not None:
      deferred[target] = _DeferredRounding()
      kwargs = {**kwargs, '_float_output': deferred[target]}
    if i in deferred:
      kwargs = {**kwargs, '_rounding': deferred[i]}
    if name == 'onehot' and num_classes is not None:
      kwargs = {'default_num_classes': num_classes, **kwargs}
    if max_pixels is not None and not _sets(name, 'max_pixels', args, kwargs):
      kwargs = {**kwargs, 'max_pixels': max_pixels}
    try:
      fns.append(_REGISTRY[name].factory(*args, **kwargs))
    except TypeError as e:
      raise ValueError(f'bad arguments for preprocessing op {name!r} in {pp!r}: {e}') from None

  def preprocess(example: Mapping) -> Example:
    data = {k: v if tf.is_tensor(v) else tf.convert_to_tensor(v) for k, v in example.items()}
    for fn in fns:
      data = fn(data)
    return {k: v for k, v in data.items() if not k.startswith('_')}

  return preprocess


# --------------------------------------------------------------------------------------------
# Helpers.


# Ops that may give float32 instead of uint8 when the image goes on to value_range, and ops that
# keep the dtype of the image (their results do not depend on it) in between.
_FLOAT_OUTPUT_OPS = ('resize', 'resize_small')
_DTYPE_PRESERVING_OPS = ('central_crop', 'flip_lr', 'random_crop', 'pad')


def _image_key(name: str, args: tuple, kwargs: dict) -> str | None:
  """The example entry an op reads ('image' by default); None for ops with no ``key``."""
  signature = inspect.signature(_REGISTRY[name].factory)
  if 'key' not in signature.parameters:
    return None
  try:
    bound = signature.bind_partial(*args, **kwargs)
  except TypeError:  # Bad arguments: the factory's call reports them.
    return None
  return bound.arguments.get('key', 'image')


def _float_target(ops: list[tuple[str, tuple, dict]], i: int) -> int | None:
  """The index of the ``value_range`` that op ``i``'s image reaches through dtype-preserving ops.

  None if there is none. Otherwise rounding op ``i``'s result to uint8 and converting it back to
  float there is wasted work, and so is rounding the whole resized image when a crop follows:
  op ``i`` gives float32 and ``value_range`` rounds (and clips) the pixels it keeps, the same
  values (rounding and clipping commute with crops, flips and pads).
  """
  key = _image_key(*ops[i])
  if key is None:
    return None
  for j in range(i + 1, len(ops)):
    name, args, kwargs = ops[j]
    if _image_key(name, args, kwargs) != key:
      return None
    if name == 'value_range':
      return j
    if name not in _DTYPE_PRESERVING_OPS:
      return None
  return None


# Resize methods whose output lies within the input's range (non-negative weights): rounding
# their uint8 results needs no clipping.
_CONVEX_METHODS = ('bilinear', 'nearest', 'area', 'gaussian')


class _DeferredRounding(threading.local):
  """What a resize leaves to its ``value_range``: set and read, in order, as the ops trace.

  ``mode``: None (the resize's input was not uint8: nothing to do), 'round' or 'round_clip'.
  Thread-local, so eager calls from several threads do not mix.
  """

  mode: str | None = None

  def resized(self, resized: tf.Tensor, like: tf.Tensor, method: str) -> tf.Tensor:
    """A resize's float32 result; records the rounding a uint8 input would have had."""
    if like.dtype != tf.uint8:
      self.mode = None
      return tf.cast(resized, like.dtype)
    self.mode = 'round' if method in _CONVEX_METHODS else 'round_clip'
    return resized

  def apply(self, image: tf.Tensor) -> tf.Tensor:
    mode, self.mode = self.mode, None
    if mode is None:
      return image
    image = tf.round(image)
    return tf.clip_by_value(image, 0, 255) if mode == 'round_clip' else image


def _sets(name: str, parameter: str, args: tuple, kwargs: dict) -> bool:
  """Whether op ``name`` has no ``parameter`` or its arguments already set it."""
  factory = _REGISTRY[name].factory
  signature = inspect.signature(factory)
  if parameter not in signature.parameters:
    return True
  try:
    return parameter in signature.bind_partial(*args, **kwargs).arguments
  except TypeError:  # Bad arguments: the factory's call reports them.
    return True


def _next_seed(data: Example, op: str) -> tf.Tensor:
  """Takes a fresh seed for one random op and advances the example's seed."""
  if RNG_KEY not in data:
    raise ValueError(
      f"random op {op!r} needs a per-example seed in example['{RNG_KEY}'] (shape "
      '[2] int64); the input pipeline adds it. For single images use deterministic '
      'ops (e.g. resize/central_crop) or add the seed yourself.'
    )
  seeds = tf.random.experimental.stateless_split(tf.cast(data[RNG_KEY], tf.int64), 2)
  data[RNG_KEY] = seeds[0]
  return seeds[1]


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Grey -> RGB by repetition, RGBA / grey+alpha -> drop alpha; static-shape friendly."""
  have = image.shape[-1]
  if have is None:
    raise ValueError('image has an unknown number of channels')
  if have == channels:
    return image
  if channels == 3:
    if have in (1, 2):
      return tf.repeat(image[..., :1], 3, axis=-1)
    if have == 4:
      return image[..., :3]
  if channels == 1 and have in (3, 4):
    return tf.cast(
      tf.round(tf.image.rgb_to_grayscale(tf.cast(image[..., :3], tf.float32))), image.dtype
    )
  raise ValueError(f'cannot convert an image with {have} channels to {channels}')


def _decode(
  image: tf.Tensor, channels: int, max_pixels: int | None = None, op: str = 'decode'
) -> tf.Tensor:
  """Encoded bytes -> uint8 HWC; a decoded (H, W) or HWC array -> ``channels`` channels.

  Encoded images over ``max_pixels`` (height x width; 0 or None: no limit) are refused before
  decoding (``images.decode``).
  """
  if image.dtype == tf.string:
    return images.decode(image, channels, max_pixels, op)
  if image.shape.rank == 2:
    image = image[..., None]
  return _to_channels(image, channels)


def _restore_dtype(
  resized: tf.Tensor, like: tf.Tensor, method: str, float_output: _DeferredRounding | None
) -> tf.Tensor:
  """Resized float values back to the input's dtype (uint8: rounded and clipped).

  ``float_output`` (set when ``value_range`` follows): float32, the rounding left to it.
  """
  if float_output is not None:
    return float_output.resized(resized, like, method)
  if like.dtype == tf.uint8:
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  return tf.cast(resized, like.dtype)


# --------------------------------------------------------------------------------------------
# Ops.


@image_op('decode', decoded=False)
def decode(channels: int = 3, max_pixels: int = base.DEFAULT_MAX_IMAGE_PIXELS):
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 HWC with `channels`; at most `max_pixels` (0: any)."""
  max_pixels = _max_pixels('decode', max_pixels)
  return lambda image: _decode(image, channels, max_pixels)


@image_op('grey_to_rgb')
def grey_to_rgb():
  """Ensures 3 channels: grey is repeated, an alpha channel is dropped."""

  def fn(image):
    if image.shape.rank == 2:
      image = image[..., None]
    return _to_channels(image, 3)

  return fn


register('rgb')(grey_to_rgb)


@image_op('resize')
def resize(size, method: str = 'bilinear', antialias: bool = False, *, _float_output=None):
  """Resizes to `size` (int or (h, w)) ignoring aspect ratio; uint8 stays uint8 (rounded)."""
  hw = sizes.pair(size, 'the size of resize')

  def fn(image):
    resized = tf.image.resize(image, hw, method=method, antialias=antialias)
    return _restore_dtype(resized, image, method, _float_output)

  return fn


@image_op('resize_small')
def resize_small(
  size: int, method: str = 'bilinear', antialias: bool = False, *, _float_output=None
):
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""

  def fn(image):
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.minimum(h, w)
    new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method=method, antialias=antialias)
    return _restore_dtype(resized, image, method, _float_output)

  return fn


@image_op('pad')
def pad(pixels, mode='constant'):
  """Adds ``pixels`` (int or (h, w)) on every side: zeros ('constant') or 'reflect' / 'symmetric'.

  With ``random_crop`` this is the usual small-image shift augmentation (pad(4)|random_crop(32)),
  which keeps the scale, unlike resize-then-crop.
  """
  ph, pw = sizes.pair(pixels, 'the padding of pad')
  mode = mode.upper()
  if mode not in ('CONSTANT', 'REFLECT', 'SYMMETRIC'):
    raise ValueError(f"pad(mode={mode.lower()!r}): use 'constant', 'reflect' or 'symmetric'.")

  def fn(image):
    return tf.pad(image, [[ph, ph], [pw, pw], [0, 0]], mode=mode)

  return fn


@image_op('central_crop')
def central_crop(size):
  """Crops the central `size` (int or (h, w)) window; the image must be at least that big."""
  ch, cw = sizes.pair(size, 'the size of central_crop')

  def fn(image):
    shape = tf.shape(image)
    tf.debugging.assert_greater_equal(
      shape[:2],
      tf.constant([ch, cw]),
      message=f'central_crop({ch}, {cw}) needs an image at least that big; resize first',
    )
    top = (shape[0] - ch) // 2
    left = (shape[1] - cw) // 2
    image = image[top : top + ch, left : left + cw]
    image.set_shape([ch, cw, image.shape[-1]])
    return image

  return fn


def _inception_window(shape, seed, area_min, area_max, aspect_min, aspect_max):
  """(begin, size) of a random crop covering area_min..area_max percent of ``shape``."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    tf.zeros([0, 0, 4], tf.float32),
    seed=seed,
    area_range=(area_min / 100, area_max / 100),
    aspect_ratio_range=(aspect_min, aspect_max),
    min_object_covered=0,
    use_image_if_no_bounding_boxes=True,
  )
  return begin, size


def _max_pixels(op: str, max_pixels) -> int:
  """The limit on decoded pixels: an integer >= 0 (0 or None: no limit)."""
  if max_pixels is None:
    return 0
  if (
    isinstance(max_pixels, (int, float))
    and not isinstance(max_pixels, bool)
    and float(max_pixels).is_integer()
    and max_pixels >= 0
  ):
    return int(max_pixels)
  raise ValueError(
    f'{op} needs max_pixels = an integer >= 0 (decoded pixels, height x width; 0: no limit), '
    f'got {max_pixels!r}'
  )


def _check_area(area_min, area_max):
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(
      f'inception_crop needs 0 < area_min <= area_max <= 100 (percent), got {area_min}, {area_max}'
    )


def _slice(image, begin, size):
  """``tf.slice`` keeping the static channel count (randaug needs it)."""
  crop = tf.slice(image, begin, size)
  crop.set_shape([None, None, image.shape[-1]])
  return crop


def _resize_crop(crop, hw, method):
  if hw is None:
    return crop
  crop = tf.image.resize(crop, hw, method=method)
  crop.set_shape([hw[0], hw[1], crop.shape[-1]])
  return crop


@image_op('inception_crop', random=True)
def inception_crop(
  size=None,
  area_min: float = 5,
  area_max: float = 100,
  aspect_min: float = 3 / 4,
  aspect_max: float = 4 / 3,
  method: str = 'bilinear',
):
  """Random crop of 5%-100% of the area (aspect 3/4-4/3), resized (float32) to `size` if given."""
  hw = None if size is None else sizes.pair(size, 'the size of inception_crop')
  _check_area(area_min, area_max)

  def fn(image, seed):
    begin, crop_size = _inception_window(
      tf.shape(image), seed, area_min, area_max, aspect_min, aspect_max
    )
    return _resize_crop(_slice(image, begin, crop_size), hw, method)

  return fn


@image_op('decode_jpeg_and_inception_crop', random=True, decoded=False)
def decode_jpeg_and_inception_crop(
  size=None,
  area_min: float = 5,
  area_max: float = 100,
  aspect_min: float = 3 / 4,
  aspect_max: float = 4 / 3,
  method: str = 'bilinear',
  max_pixels: int = base.DEFAULT_MAX_IMAGE_PIXELS,
):
  """Same as decode|inception_crop(...) but faster on JPEGs: only the window is decoded."""
  name = 'decode_jpeg_and_inception_crop'
  hw = None if size is None else sizes.pair(size, f'the size of {name}')
  _check_area(area_min, area_max)
  max_pixels = _max_pixels(name, max_pixels)
  window = lambda shape, seed: _inception_window(
    shape, seed, area_min, area_max, aspect_min, aspect_max
  )

  def fn(encoded, seed):
    if encoded.dtype != tf.string:  # Already decoded (in-memory data sets): decode|inception_crop.
      image = _decode(encoded, 3)
      begin, crop_size = window(tf.shape(image), seed)
      return _resize_crop(_slice(image, begin, crop_size), hw, method)

    encoded = images.check_pixels(encoded, max_pixels, name)

    def jpeg():
      begin, crop_size = window(tf.io.extract_jpeg_shape(encoded), seed)
      return tf.io.decode_and_crop_jpeg(
        encoded, tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]]), channels=3
      )

    def other():
      image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
      begin, crop_size = window(tf.shape(image), seed)
      return tf.slice(image, begin, crop_size)

    crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    crop.set_shape([None, None, 3])
    return _resize_crop(crop, hw, method)

  return fn


@image_op('random_crop', random=True)
def random_crop(size):
  """Random `size` window (no resizing); the image must be at least that big."""
  ch, cw = sizes.pair(size, 'the size of random_crop')

  def fn(image, seed):
    channels = image.shape[-1]
    image = tf.image.stateless_random_crop(image, [ch, cw, tf.shape(image)[-1]], seed=seed)
    image.set_shape([ch, cw, channels])
    return image

  return fn


@image_op('flip_lr', random=True)
def flip_lr():
  """Mirrors the image left-right with probability 1/2."""
  return lambda image, seed: tf.image.stateless_random_flip_left_right(image, seed)


@image_op('randaug', random=True)
def randaug(
  num_layers: int = 2,
  magnitude: float = 10,
  ops='big_vision',
  translate_const: float = 100,
  cutout_const: float = 40,
):
  """RandAugment: `num_layers` random ops at `magnitude` (big_vision's/AugReg's; see randaug)."""
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(f'randaug needs num_layers = an integer >= 0, got {num_layers!r}')
  for name, value in (
    ('magnitude', magnitude),
    ('translate_const', translate_const),
    ('cutout_const', cutout_const),
  ):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
      raise ValueError(
        f'randaug needs {name} = a number >= 0 (magnitude: 10 is the AutoAugment maximum, '
        f'AugReg uses 0-20), got {value!r}'
      )
  names = randaug_lib.op_names(ops)
  return lambda image, seed: randaug_lib.distort(
    image, seed, num_layers, magnitude, names, translate_const, cutout_const
  )


@image_op('value_range')
def value_range(
  vmin: float = -1,
  vmax: float = 1,
  in_min: float = 0,
  in_max: float = 255,
  *,
  _rounding: _DeferredRounding | None = None,
):
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32: default (x - 127.5) / 127.5."""
  if vmax <= vmin or in_max <= in_min:
    raise ValueError(
      f'value_range needs vmin < vmax and in_min < in_max, got {vmin}, {vmax}, {in_min}, {in_max}'
    )
  scale = (in_max - in_min) / (vmax - vmin)
  center = in_min - vmin * scale
  if _rounding is None:
    return lambda image: (tf.cast(image, tf.float32) - center) / scale
  return lambda image: (_rounding.apply(tf.cast(image, tf.float32)) - center) / scale


@register('onehot')
def onehot(
  num_classes: int | None = None,
  smoothing: float = 0.0,
  key: str = 'label',
  key_result: str = 'labels',
  default_num_classes: int | None = None,
) -> OpFn:
  """Integer label -> float32 one-hot `labels`, optionally label-smoothed."""
  n = num_classes or default_num_classes
  if not n:
    raise ValueError(
      'onehot needs the number of classes: write onehot(N) or let the pipeline '
      "pass the data set's class count"
    )
  if not 0 <= smoothing < 1:
    raise ValueError(f'onehot smoothing must be in [0, 1), got {smoothing}')

  def fn(data):
    labels = tf.one_hot(tf.cast(data[key], tf.int32), n, dtype=tf.float32)
    if smoothing:
      labels = labels * (1 - smoothing) + smoothing / n
    data[key_result] = labels
    return data

  return fn


@register('keep')
def keep(*keys: str) -> OpFn:
  """Keeps only the given keys (and the private seed)."""

  def fn(data):
    return {k: v for k, v in data.items() if k in keys or k.startswith('_')}

  return fn
