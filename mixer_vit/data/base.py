"""What the data modules share: the data config, data set info, splits and sources.

This module imports no other ``mixer_vit.data`` module; the others build on it: ``images``
(decoding under a limit on pixels), ``folder`` (image folders), ``tfds_source`` and
``tfds_stream`` (tfds data sets), ``sources`` (picks the source for ``DataConfig.dataset``),
``preprocess`` (ops) and ``pipeline`` (batches).

A source opens splits. A split knows its size and yields, for one process of ``count``, either an
endless training stream in a seeded order or one pass over its disjoint part for evaluation.
Every element carries its position in the process's stream (``_position``, the key of its random
augmentation) and its index in the split (``_index``, for checks and error messages).

Random-access splits (in memory or files on disk) give process ``p`` of ``P`` the examples
``p, p + P, p + 2P, ...`` and visit them, in epoch ``e``, in the order of a stateless permutation
keyed by (seed, p, e) (``tf.random.experimental.index_shuffle``). The example at any stream
position is computed directly, so resuming at step ``s`` costs nothing.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
import dataclasses
import numbers
import os
import threading
from typing import Any

import numpy as np
import tensorflow as tf

SHUFFLE_SALT = 0x5EED5EED
DEFAULT_IN_MEMORY_MB = 1024
DEFAULT_SHUFFLE_BUFFER = 10_000
DEFAULT_MAX_IMAGE_PIXELS = 8000 * 8000  # Decoded pixels (height x width) per image.


# --------------------------------------------------------------------------------------------
# The data config.


def _read(config: Any, key: str) -> Any:
  """``config[key]`` of a ConfigDict or a dict; None when missing."""
  return config.get(key, None)


def _text(key: str, value: Any, required: str | None = None) -> str | None:
  """A non-empty string (paths allowed), else None; ``required``: the error's advice."""
  if isinstance(value, os.PathLike):
    value = os.fspath(value)
  if value is not None and not isinstance(value, str):
    raise ValueError(f'config.{key} must be a string, got {value!r}')
  if not value:
    if required:
      raise ValueError(f'config.{key} is not set; {required}')
    return None
  return value


def _int(key: str, value: Any, default: int | None, minimum: int | None, what: str) -> int | None:
  """An integer (int, integral float or digits) >= ``minimum``; ``default`` when None."""
  if value is None:
    return default
  number = None
  if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
    number = int(value)
  elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
    number = int(value) if float(value).is_integer() else None
  elif isinstance(value, str):
    try:
      number = int(value.strip())
    except ValueError:
      number = None
  if number is None or (minimum is not None and number < minimum):
    bound = '' if minimum is None else f' >= {minimum}'
    raise ValueError(f'config.{key} must be an integer{bound} ({what}), got {value!r}')
  return number


def _float(key: str, value: Any, default: float, what: str) -> float:
  """A number >= 0; ``default`` when None."""
  if value is None:
    return default
  try:
    if isinstance(value, (bool, np.bool_)):
      raise ValueError
    number = float(value)
  except (TypeError, ValueError):
    number = -1.0
  if not number >= 0:  # Also NaN.
    raise ValueError(f'config.{key} must be a number >= 0 ({what}), got {value!r}')
  return number


def _bool(key: str, value: Any, what: str) -> bool:
  if value is None:
    return False
  if isinstance(value, (bool, np.bool_)) or (
    isinstance(value, numbers.Integral) and value in (0, 1)
  ):
    return bool(value)
  raise ValueError(f'config.{key} must be True or False ({what}), got {value!r}')


@dataclasses.dataclass(frozen=True)
class MixOption:
  """Mixup or CutMix of training batches: applied to a batch with probability ``p``, the mixing
  weight drawn from Beta(``alpha``, ``alpha``) (see ``mix``)."""

  p: float
  alpha: float


_MIX_WHAT = {
  'mixup': "e.g. {'p': 1.0, 'alpha': 0.2}: p = the probability that a batch is mixed, alpha = "
  'the Beta(alpha, alpha) concentration (big_vision calls it mixup.p)',
  'cutmix': "e.g. {'p': 0.5, 'alpha': 1.0}: p = the probability that a batch gets a pasted box, "
  'alpha = the Beta(alpha, alpha) concentration of the kept area',
}


def _mix(key: str, value: Any) -> MixOption | None:
  """``config.mixup`` / ``config.cutmix``: None, {} or p = 0 (off), or {'p', 'alpha'}."""
  if value is None:
    return None
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  what = _MIX_WHAT[key]
  if not isinstance(value, Mapping):
    raise ValueError(f'config.{key} must be a dict ({what}) or None, got {value!r}')
  unknown = sorted(set(value) - {'p', 'alpha'})
  if unknown:
    raise ValueError(f'config.{key} has unknown keys {unknown}; use p and alpha ({what})')
  if not value:
    return None
  p = _float(f'{key}.p', value.get('p'), 1.0, 'the probability that a batch is mixed')
  if p > 1:
    raise ValueError(f'config.{key}.p must be a probability in [0, 1], got {p!r} ({what})')
  if p == 0:
    return None
  if value.get('alpha') is None:
    raise ValueError(f'config.{key}.alpha is not set; {what}')
  alpha = _float(f'{key}.alpha', value.get('alpha'), 0.0, what)
  if alpha <= 0:
    raise ValueError(f'config.{key}.alpha must be > 0, got {alpha!r} ({what})')
  return MixOption(p, alpha)


def _mixes(mixup: Any, cutmix: Any) -> dict[str, MixOption | None]:
  result = {'mixup': _mix('mixup', mixup), 'cutmix': _mix('cutmix', cutmix)}
  total = sum(option.p for option in result.values() if option is not None)
  if total > 1 + 1e-9:
    raise ValueError(
      f'config.mixup.p + config.cutmix.p = {total:g} > 1; a batch gets at most one of them (mixup '
      "with probability mixup.p, CutMix with cutmix.p): e.g. timm's prob=1, switch_prob=0.5 is "
      'mixup.p = cutmix.p = 0.5'
    )
  return result


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The settings of the input pipeline, read once from the training config.

  ``DataConfig.from_config(config)`` takes the keys below from an ml_collections ConfigDict or a
  dict (other keys are ignored; missing keys and None take the defaults) and checks them.
  """

  dataset: str  # 'digits', a tfds name ('mnist', 'name/config:1.0.0') or an image folder path.
  data_dir: str | None = None  # tfds data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
  train_split: str = 'train'
  test_split: str = 'test'
  pp_train: str | None = None  # Preprocessing strings; needed once training / eval data are read.
  pp_test: str | None = None
  batch_size: int | None = None  # Global, over all processes; needed by the iterators.
  eval_batch_size: int | None = None  # Global; None: batch_size.
  seed: int = 0  # Example order and random augmentations.
  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER  # Records per shuffled block of streamed tfds sets.
  prefetch: int = 2  # Batches tf.data prepares ahead (0: tf.data.AUTOTUNE).
  skip_corrupt: bool = False  # Image folders: leave undecodable files out (else: an error).
  in_memory_max_mb: float = DEFAULT_IN_MEMORY_MB  # Splits up to this size are read into memory.
  data_threads: int = 0  # tf.data threads (0: all cores).
  device_prefetch: int = 2  # Batches placed on the devices ahead of use.
  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # Larger images are refused (0: no limit).
  mixup: MixOption | None = None  # Mixup of training batches (None: off).
  cutmix: MixOption | None = None  # CutMix of training batches (None: off).

  @classmethod
  def from_config(cls, config: Any) -> DataConfig:
    """The data settings of a training config (a ConfigDict or a dict); a DataConfig as is."""
    if isinstance(config, DataConfig):
      return config
    if not (isinstance(config, Mapping) or callable(getattr(config, 'get', None))):
      raise TypeError(
        f'the data pipeline needs a ConfigDict, a dict or a DataConfig, got {type(config)}'
      )
    get = lambda key: _read(config, key)
    eval_batch_size = _int(
      'eval_batch_size', get('eval_batch_size'), None, 0, 'global; 0 or None: batch_size'
    )
    return cls(
      dataset=_text(
        'dataset',
        get('dataset'),
        required="use 'digits' (offline), a tfds name such as 'mnist', or an image folder path",
      ),
      data_dir=_text('data_dir', get('data_dir')),
      train_split=_text('train_split', get('train_split')) or 'train',
      test_split=_text('test_split', get('test_split')) or 'test',
      pp_train=_text('pp_train', get('pp_train')),
      pp_test=_text('pp_test', get('pp_test')),
      batch_size=_int('batch_size', get('batch_size'), None, 1, 'the global batch size'),
      eval_batch_size=eval_batch_size or None,
      seed=_int('seed', get('seed'), 0, None, 'the seed of the data order and augmentations'),
      shuffle_buffer=_int(
        'shuffle_buffer',
        get('shuffle_buffer'),
        DEFAULT_SHUFFLE_BUFFER,
        0,
        f'records per shuffled block of streamed data sets; 0: {DEFAULT_SHUFFLE_BUFFER}',
      ),
      prefetch=_int('prefetch', get('prefetch'), 2, -1, 'batches to prefetch; 0: autotune'),
      skip_corrupt=_bool('skip_corrupt', get('skip_corrupt'), 'leave corrupt image files out'),
      in_memory_max_mb=_float(
        'in_memory_max_mb',
        get('in_memory_max_mb'),
        DEFAULT_IN_MEMORY_MB,
        'splits up to this many MB are read into memory; 0: stream everything',
      ),
      data_threads=_int('data_threads', get('data_threads'), 0, 0, 'tf.data threads; 0: all'),
      device_prefetch=_int(
        'device_prefetch', get('device_prefetch'), 2, 0, 'batches placed on devices ahead'
      ),
      max_image_pixels=_int(
        'max_image_pixels',
        get('max_image_pixels'),
        DEFAULT_MAX_IMAGE_PIXELS,
        0,
        'decoded pixels (height x width) an image may have; 0: no limit',
      ),
      **_mixes(get('mixup'), get('cutmix')),
    )

  @property
  def mixes(self) -> bool:
    """Whether training batches are mixed (mixup or CutMix)."""
    return self.mixup is not None or self.cutmix is not None

  def require(self, key: str) -> Any:
    """The value of ``key``; an error naming it when it is not set."""
    value = getattr(self, key)
    if value is None:
      raise ValueError(f'config.{key} is not set; the data pipeline needs it')
    return value

  @property
  def in_memory_max_bytes(self) -> int:
    return int(self.in_memory_max_mb * 2**20)

  @property
  def threads(self) -> int:
    """tf.data threads: ``data_threads``, or all cores."""
    return self.data_threads or max(1, os.cpu_count() or 1)

  @property
  def global_eval_batch_size(self) -> int:
    return self.eval_batch_size or self.require('batch_size')


# --------------------------------------------------------------------------------------------
# Data set info and splits.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a data set before reading it."""

  name: str
  num_classes: int
  class_names: list[str] | None
  num_examples: dict[str, int]  # split string -> number of examples
  image_shape: tuple[int, int, int] | None = None  # native (H, W, C) when all images share it


def shuffle_key(seed: int, process_index: int, epoch) -> tf.Tensor:
  """The permutation key of one process's epoch: a stateless function of its arguments."""
  key = tf.constant([seed, SHUFFLE_SALT], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, process_index)
  return tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64))


class Split(abc.ABC):
  """One split (e.g. ``'train[:98%]'``) of a data set, read per process.

  The streams come in two stages so that the pipeline can load each example inside its
  preprocessing map (one map per example instead of two): ``train_elements`` /
  ``eval_elements`` give cheap elements (an index and a position, or a raw record), and
  ``load`` turns one into ``{'image', 'label', '_index', '_position'}``.
  """

  num_examples: int

  @abc.abstractmethod
  def local_count(self, process_index: int, process_count: int) -> int:
    """How many examples of the split process ``process_index`` reads per epoch / pass."""

  @abc.abstractmethod
  def train_elements(
    self, process_index: int, process_count: int, seed: int, start_position: int
  ) -> tf.data.Dataset:
    """Endless stream of unloaded elements (see ``load``) from ``start_position``."""

  @abc.abstractmethod
  def eval_elements(self, process_index: int, process_count: int) -> tf.data.Dataset:
    """One pass over this process's part, unloaded elements (see ``load``)."""

  @abc.abstractmethod
  def load(self, element) -> dict[str, tf.Tensor]:
    """An element of the two streams above -> ``{'image', 'label', '_index', '_position'}``."""

  def train_indices(self, process_index, process_count, seed, positions) -> np.ndarray | None:
    """Split indices of the examples at ``positions`` of the training stream, if computable."""
    del process_index, process_count, seed, positions
    return None

  def eval_indices(self, process_index, process_count, positions) -> np.ndarray | None:
    """Split indices of the examples at ``positions`` of the evaluation pass, if computable."""
    del process_index, process_count, positions
    return None

  def find_corrupt(self, indices) -> list[str]:
    """Names of the undecodable examples among ``indices`` (for error messages)."""
    del indices
    return []


SHUFFLE_BLOCK = 1024  # Positions whose indices are computed in one vectorised index_shuffle.


class RandomAccessSplit(Split):
  """A split whose example ``i`` can be loaded directly (``load_index(i)`` in TensorFlow).

  ``storage`` says how the split is held, for the data benchmark's plain tf.data reference:
  ``('memory', images, labels)`` (arrays, decoded or encoded bytes) or ``('files', paths,
  labels)``; None when it cannot be read any other way.
  """

  def __init__(
    self,
    num_examples: int,
    load: Callable[[tf.Tensor], dict[str, tf.Tensor]],
    check: Callable[[int], str | None] | None = None,
    storage: tuple[str, np.ndarray, np.ndarray] | None = None,
  ):
    self.num_examples = int(num_examples)
    self._load = load
    self._check = check
    self.storage = storage

  def local_count(self, process_index, process_count):
    return len(range(process_index, self.num_examples, process_count))

  def _local_count_or_error(self, process_index, process_count):
    n = self.local_count(process_index, process_count)
    if n == 0:
      raise ValueError(
        f'the training split has {self.num_examples} examples, fewer than the '
        f'{process_count} processes; use a bigger split'
      )
    return n

  def _shuffled(self, offsets, key, n, process_index, process_count):
    """Split indices of the local ``offsets`` (a vector or a scalar) in the epoch of ``key``."""
    local = tf.random.experimental.index_shuffle(offsets, key, tf.constant(n - 1, tf.int64))
    return process_index + process_count * local

  def train_elements(self, process_index, process_count, seed, start_position):
    """``{'_index', '_position'}``; the epoch's key is computed once, indices per block.

    Epoch ``e`` visits the local examples in the permutation ``index_shuffle(., key(seed, p,
    e))``, evaluated on blocks of ``SHUFFLE_BLOCK`` offsets at once. Position ``q`` is offset
    ``q mod n`` of epoch ``q // n`` whatever the block boundaries, so the stream from
    ``start_position`` is exactly the tail of the stream from 0.
    """
    n = self._local_count_or_error(process_index, process_count)
    e0, within = divmod(int(start_position), n)

    def epoch(e):
      key = shuffle_key(seed, process_index, e)
      first = tf.where(tf.equal(e, e0), tf.constant(within, tf.int64), 0)
      offsets = tf.data.Dataset.range(first, n).batch(SHUFFLE_BLOCK)

      def block(o):
        return {
          '_index': self._shuffled(o, key, n, process_index, process_count),
          '_position': e * n + o,
        }

      return offsets.map(block)

    epochs = tf.data.Dataset.counter(start=e0, dtype=tf.int64)
    return epochs.flat_map(epoch).unbatch()

  def eval_elements(self, process_index, process_count):
    n = self.local_count(process_index, process_count)
    return tf.data.Dataset.range(n).map(
      lambda p: {'_index': process_index + process_count * p, '_position': p}
    )

  def load(self, element):
    example = dict(self._load(element['_index']))
    example['_index'] = element['_index']
    example['_position'] = element['_position']
    return example

  def train_indices(self, process_index, process_count, seed, positions):
    n = self._local_count_or_error(process_index, process_count)
    positions = np.asarray(positions, np.int64)
    result = np.zeros(positions.shape, np.int64)
    for e in np.unique(positions // n):
      chosen = positions // n == e
      key = shuffle_key(seed, process_index, int(e))
      offsets = tf.constant(positions[chosen] % n, tf.int64)
      result[chosen] = self._shuffled(offsets, key, n, process_index, process_count).numpy()
    return result

  def eval_indices(self, process_index, process_count, positions):
    return process_index + process_count * np.asarray(positions, np.int64)

  def find_corrupt(self, indices):
    if self._check is None:
      return []
    return [name for name in (self._check(int(i)) for i in indices) if name]


def in_memory_split(images: np.ndarray, labels: np.ndarray, check=None) -> RandomAccessSplit:
  """A split held in memory: uint8 image arrays (N, H, W, C) or encoded bytes (N,)."""
  labels = np.asarray(labels, np.int64)
  images_t = tf.constant(images)
  labels_t = tf.constant(labels)

  def load(i):
    return {'image': tf.gather(images_t, i), 'label': tf.gather(labels_t, i)}

  return RandomAccessSplit(len(labels), load, check, storage=('memory', images, labels))


# --------------------------------------------------------------------------------------------
# Sources.


class Source(abc.ABC):
  """An opened data set: class names and its splits."""

  name: str
  num_classes: int
  class_names: list[str] | None
  image_shape: tuple[int, int, int] | None = None
  _cache_lock = threading.RLock()  # Opening a split is rare: one lock for every source.

  @abc.abstractmethod
  def num_examples(self, split: str) -> int:
    """Size of ``split`` without reading it."""

  def split(self, split: str) -> Split:
    """Opens ``split`` for reading once (``_open``); later calls, from any thread, share it."""
    with Source._cache_lock:
      opened = self.__dict__.setdefault('_opened_splits', {})
      if split not in opened:
        opened[split] = self._open(split)
      return opened[split]

  @abc.abstractmethod
  def _open(self, split: str) -> Split:
    """Opens ``split`` for reading (called once per split by ``split``)."""

  def info(self, splits) -> DatasetInfo:
    return DatasetInfo(
      name=self.name,
      num_classes=self.num_classes,
      class_names=self.class_names,
      num_examples={s: self.num_examples(s) for s in splits if s},
      image_shape=self.image_shape,
    )
