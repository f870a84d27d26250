"""Preprocessing ops, composed from strings like ``'decode|resize(256)|central_crop(224)'``.

Each op is a small function from an example dict to an example dict, written with TensorFlow ops
so it runs inside ``tf.data`` and, unchanged, eagerly on a single image (inference).

Syntax: ops are separated by ``|``; an op is ``name`` or ``name(args)`` with Python literal
arguments, positional or by keyword: ``onehot(10, smoothing=0.1)``, ``resize((224, 160))``.

Random ops (``inception_crop``, ``flip_lr``) are stateless: they draw from the per-example seed
``example['_rng']`` (shape [2], int64), which the input pipeline derives from the run's seed and
the example's position in the stream. The same seed and position always give the same output,
which is what makes resuming a run exact.

``resize`` and ``resize_small`` keep the input's dtype (uint8 results are rounded), like
big_vision's ops. ``inception_crop(size)`` returns float32 values in [0, 255], not rounded back
(half again faster on the training path, where the crop is random anyway); ``value_range`` then
maps either to [-1, 1].
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, Mapping

import tensorflow as tf

Example = dict[str, Any]
OpFn = Callable[[Example], Example]

RNG_KEY = "_rng"


@dataclasses.dataclass(frozen=True)
class _OpSpec:
  factory: Callable[..., OpFn]
  random: bool
  doc: str


_REGISTRY: dict[str, _OpSpec] = {}


def register(name: str, random: bool = False):
  """Registers an op factory under ``name`` (``random=True``: it consumes ``example['_rng']``)."""
  def wrap(factory):
    _REGISTRY[name] = _OpSpec(factory, random, (factory.__doc__ or "").strip().split("\n")[0])
    return factory
  return wrap


def list_ops() -> dict[str, str]:
  """Op name -> one-line description (random ops are marked)."""
  return {name: ("[random] " if spec.random else "") + spec.doc
          for name, spec in sorted(_REGISTRY.items())}


# --------------------------------------------------------------------------------------------
# Parsing.


def parse(pp: str) -> list[tuple[str, tuple, dict]]:
  """Splits a pp string into ``(name, args, kwargs)`` triples; errors name the bad part."""
  if not isinstance(pp, str) or not pp.strip():
    raise ValueError(f"empty preprocessing string {pp!r}; e.g. 'decode|value_range(-1,1)|onehot'")
  ops = []
  for part in pp.split("|"):
    part = part.strip()
    try:
      call = ast.parse(part, mode="eval").body
      if isinstance(call, ast.Name):
        name, args, kwargs = call.id, (), {}
      elif isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
        name = call.func.id
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
      else:
        raise ValueError("not an op call")
    except (SyntaxError, ValueError) as e:
      raise ValueError(f"cannot parse preprocessing op {part!r} in {pp!r} ({e}); ops look like "
                       "'name' or 'name(literal args)', separated by '|'") from None
    if name not in _REGISTRY:
      raise ValueError(f"unknown preprocessing op {name!r} in {pp!r}; known ops: "
                       f"{', '.join(sorted(_REGISTRY))}")
    ops.append((name, args, kwargs))
  return ops


def is_deterministic(pp: str) -> bool:
  """True when no op of ``pp`` is random (evaluation requires this)."""
  return not any(_REGISTRY[name].random for name, _, _ in parse(pp))


def get_preprocess_fn(pp: str, num_classes: int | None = None) -> Callable[[Mapping], Example]:
  """Composes the ops of ``pp`` into one function ``example dict -> example dict``.

  Args:
    pp: the preprocessing string.
    num_classes: the class count that ``onehot`` without an explicit count uses.

  Returns:
    A function usable in ``tf.data.Dataset.map`` or eagerly on one example, e.g.
    ``fn({'image': uint8 HWC array or encoded bytes, 'label': 3})``. Keys starting with ``_``
    (the per-example seed) are dropped from the result.
  """
  fns = []
  for name, args, kwargs in parse(pp):
    if name == "onehot" and num_classes is not None:
      kwargs = {"default_num_classes": num_classes, **kwargs}
    try:
      fns.append(_REGISTRY[name].factory(*args, **kwargs))
    except TypeError as e:
      raise ValueError(f"bad arguments for preprocessing op {name!r} in {pp!r}: {e}") from None

  def preprocess(example: Mapping) -> Example:
    data = {k: v if tf.is_tensor(v) else tf.convert_to_tensor(v) for k, v in example.items()}
    for fn in fns:
      data = fn(data)
    return {k: v for k, v in data.items() if not k.startswith("_")}

  return preprocess


# --------------------------------------------------------------------------------------------
# Helpers.


def _next_seed(data: Example, op: str) -> tf.Tensor:
  """Takes a fresh seed for one random op and advances the example's seed."""
  if RNG_KEY not in data:
    raise ValueError(f"random op {op!r} needs a per-example seed in example['{RNG_KEY}'] (shape "
                     "[2] int64); the input pipeline adds it. For single images use deterministic "
                     "ops (e.g. resize/central_crop) or add the seed yourself.")
  seeds = tf.random.experimental.stateless_split(tf.cast(data[RNG_KEY], tf.int64), 2)
  data[RNG_KEY] = seeds[0]
  return seeds[1]


def _size(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
    return int(size[0]), int(size[1])
  raise ValueError(f"size must be an int or (height, width), got {size!r}")


def _image(data: Example, key: str, op: str) -> tf.Tensor:
  image = data[key]
  if image.dtype == tf.string:
    raise ValueError(f"op {op!r} got encoded image bytes in {key!r}; put 'decode' first in the "
                     "preprocessing string")
  return image


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Grey -> RGB by repetition, RGBA / grey+alpha -> drop alpha; static-shape friendly."""
  have = image.shape[-1]
  if have is None:
    raise ValueError("image has an unknown number of channels")
  if have == channels:
    return image
  if channels == 3:
    if have in (1, 2):
      return tf.repeat(image[..., :1], 3, axis=-1)
    if have == 4:
      return image[..., :3]
  if channels == 1 and have in (3, 4):
    return tf.cast(tf.round(tf.image.rgb_to_grayscale(tf.cast(image[..., :3], tf.float32))),
                   image.dtype)
  raise ValueError(f"cannot convert an image with {have} channels to {channels}")


def _restore_dtype(resized: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
  """Resized float values back to the input's dtype (uint8: rounded and clipped)."""
  if like.dtype == tf.uint8:
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  return tf.cast(resized, like.dtype)


# --------------------------------------------------------------------------------------------
# Ops.


@register("decode")
def decode(channels: int = 3, key: str = "image") -> OpFn:
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 HWC with `channels` (grey/RGBA converted)."""
  def fn(data):
    image = data[key]
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=channels, expand_animations=False)
      image.set_shape([None, None, channels])
    else:
      if image.shape.rank == 2:
        image = image[..., None]
      image = _to_channels(image, channels)
    data[key] = image
    return data
  return fn


@register("grey_to_rgb")
def grey_to_rgb(key: str = "image") -> OpFn:
  """Ensures 3 channels: grey is repeated, an alpha channel is dropped."""
  def fn(data):
    image = _image(data, key, "grey_to_rgb")
    if image.shape.rank == 2:
      image = image[..., None]
    data[key] = _to_channels(image, 3)
    return data
  return fn


register("rgb")(grey_to_rgb)


@register("resize")
def resize(size, method: str = "bilinear", antialias: bool = False, key: str = "image") -> OpFn:
  """Resizes to `size` (int or (h, w)) ignoring aspect ratio; uint8 stays uint8 (rounded)."""
  hw = _size(size)

  def fn(data):
    image = _image(data, key, "resize")
    data[key] = _restore_dtype(tf.image.resize(image, hw, method=method, antialias=antialias),
                               image)
    return data
  return fn


@register("resize_small")
def resize_small(size: int, method: str = "bilinear", antialias: bool = False,
                 key: str = "image") -> OpFn:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  def fn(data):
    image = _image(data, key, "resize_small")
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.minimum(h, w)
    new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
    data[key] = _restore_dtype(
        tf.image.resize(image, tf.stack([new_h, new_w]), method=method, antialias=antialias),
        image)
    return data
  return fn


@register("central_crop")
def central_crop(size, key: str = "image") -> OpFn:
  """Crops the central `size` (int or (h, w)) window; the image must be at least that big."""
  ch, cw = _size(size)

  def fn(data):
    image = _image(data, key, "central_crop")
    shape = tf.shape(image)
    tf.debugging.assert_greater_equal(
        shape[:2], tf.constant([ch, cw]),
        message=f"central_crop({ch}, {cw}) needs an image at least that big; resize first")
    top = (shape[0] - ch) // 2
    left = (shape[1] - cw) // 2
    image = image[top:top + ch, left:left + cw]
    image.set_shape([ch, cw, image.shape[-1]])
    data[key] = image
    return data
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
      use_image_if_no_bounding_boxes=True)
  return begin, size


def _check_area(area_min, area_max):
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"inception_crop needs 0 < area_min <= area_max <= 100 (percent), got "
                     f"{area_min}, {area_max}")


def _resize_crop(crop, hw, method):
  if hw is None:
    return crop
  crop = tf.image.resize(crop, hw, method=method)
  crop.set_shape([hw[0], hw[1], crop.shape[-1]])
  return crop


@register("inception_crop", random=True)
def inception_crop(size=None, area_min: float = 5, area_max: float = 100,
                   aspect_min: float = 3 / 4, aspect_max: float = 4 / 3,
                   method: str = "bilinear", key: str = "image") -> OpFn:
  """Random crop of 5%-100% of the area (aspect 3/4-4/3), resized (float32) to `size` if given."""
  hw = None if size is None else _size(size)
  _check_area(area_min, area_max)

  def fn(data):
    image = _image(data, key, "inception_crop")
    seed = _next_seed(data, "inception_crop")
    begin, crop_size = _inception_window(tf.shape(image), seed, area_min, area_max, aspect_min,
                                         aspect_max)
    data[key] = _resize_crop(tf.slice(image, begin, crop_size), hw, method)
    return data
  return fn


@register("decode_jpeg_and_inception_crop", random=True)
def decode_jpeg_and_inception_crop(size=None, area_min: float = 5, area_max: float = 100,
                                   aspect_min: float = 3 / 4, aspect_max: float = 4 / 3,
                                   method: str = "bilinear", key: str = "image") -> OpFn:
  """Same as decode|inception_crop(...) but faster on JPEGs: only the window is decoded."""
  hw = None if size is None else _size(size)
  _check_area(area_min, area_max)
  window = lambda shape, seed: _inception_window(shape, seed, area_min, area_max, aspect_min,
                                                 aspect_max)

  def fn(data):
    encoded = data[key]
    if encoded.dtype != tf.string:  # Already decoded (in-memory data sets).
      return inception_crop(size, area_min, area_max, aspect_min, aspect_max, method,
                            key)(decode(3, key)(data))
    seed = _next_seed(data, "decode_jpeg_and_inception_crop")

    def jpeg():
      begin, crop_size = window(tf.io.extract_jpeg_shape(encoded), seed)
      return tf.io.decode_and_crop_jpeg(
          encoded, tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]]), channels=3)

    def other():
      image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
      begin, crop_size = window(tf.shape(image), seed)
      return tf.slice(image, begin, crop_size)

    crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    crop.set_shape([None, None, 3])
    data[key] = _resize_crop(crop, hw, method)
    return data
  return fn


@register("random_crop", random=True)
def random_crop(size, key: str = "image") -> OpFn:
  """Random `size` window (no resizing); the image must be at least that big."""
  ch, cw = _size(size)

  def fn(data):
    image = _image(data, key, "random_crop")
    seed = _next_seed(data, "random_crop")
    channels = image.shape[-1]
    image = tf.image.stateless_random_crop(image, [ch, cw, tf.shape(image)[-1]], seed=seed)
    image.set_shape([ch, cw, channels])
    data[key] = image
    return data
  return fn


@register("flip_lr", random=True)
def flip_lr(key: str = "image") -> OpFn:
  """Mirrors the image left-right with probability 1/2."""
  def fn(data):
    image = _image(data, key, "flip_lr")
    data[key] = tf.image.stateless_random_flip_left_right(image, _next_seed(data, "flip_lr"))
    return data
  return fn


@register("value_range")
def value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255,
                key: str = "image") -> OpFn:
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32: default (x - 127.5) / 127.5."""
  if vmax <= vmin or in_max <= in_min:
    raise ValueError(f"value_range needs vmin < vmax and in_min < in_max, got {vmin}, {vmax}, "
                     f"{in_min}, {in_max}")
  scale = (in_max - in_min) / (vmax - vmin)
  center = in_min - vmin * scale

  def fn(data):
    image = tf.cast(_image(data, key, "value_range"), tf.float32)
    data[key] = (image - center) / scale
    return data
  return fn


@register("onehot")
def onehot(num_classes: int | None = None, smoothing: float = 0.0, key: str = "label",
           key_result: str = "labels", default_num_classes: int | None = None) -> OpFn:
  """Integer label -> float32 one-hot `labels`, optionally label-smoothed."""
  n = num_classes or default_num_classes
  if not n:
    raise ValueError("onehot needs the number of classes: write onehot(N) or let the pipeline "
                     "pass the data set's class count")
  if not 0 <= smoothing < 1:
    raise ValueError(f"onehot smoothing must be in [0, 1), got {smoothing}")

  def fn(data):
    labels = tf.one_hot(tf.cast(data[key], tf.int32), n, dtype=tf.float32)
    if smoothing:
      labels = labels * (1 - smoothing) + smoothing / n
    data[key_result] = labels
    return data
  return fn


@register("keep")
def keep(*keys: str) -> OpFn:
  """Keeps only the given keys (and the private seed)."""
  def fn(data):
    return {k: v for k, v in data.items() if k in keys or k.startswith("_")}
  return fn
