"""Data sources behind one entry point: tfds data sets, image folders and the bundled digits.

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
import dataclasses
import os
import threading
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mixer_vit.data import tfds_source

SHUFFLE_SALT = 0x5EED5EED
DEFAULT_IN_MEMORY_MB = 1024


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
  """One split (e.g. ``'train[:98%]'``) of a data set, read per process."""

  num_examples: int

  @abc.abstractmethod
  def local_count(self, process_index: int, process_count: int) -> int:
    """How many examples of the split process ``process_index`` reads per epoch / pass."""

  @abc.abstractmethod
  def train_dataset(self, process_index: int, process_count: int, seed: int,
                    start_position: int) -> tf.data.Dataset:
    """Endless stream of ``{'image', 'label', '_index', '_position'}`` from ``start_position``."""

  @abc.abstractmethod
  def eval_dataset(self, process_index: int, process_count: int) -> tf.data.Dataset:
    """One pass over this process's part, ``{'image', 'label', '_index', '_position'}``."""

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


class RandomAccessSplit(Split):
  """A split whose example ``i`` can be loaded directly (``load(i)`` in TensorFlow)."""

  def __init__(self, num_examples: int, load: Callable[[tf.Tensor], dict[str, tf.Tensor]],
               check: Callable[[int], str | None] | None = None):
    self.num_examples = int(num_examples)
    self._load = load
    self._check = check

  def local_count(self, process_index, process_count):
    return len(range(process_index, self.num_examples, process_count))

  def _train_index_fn(self, process_index, process_count, seed):
    n = self.local_count(process_index, process_count)
    if n == 0:
      raise ValueError(f"the training split has {self.num_examples} examples, fewer than the "
                       f"{process_count} processes; use a bigger split")

    def index(position):
      position = tf.cast(position, tf.int64)
      epoch, offset = position // n, position % n
      local = tf.random.experimental.index_shuffle(
          offset, shuffle_key(seed, process_index, epoch), tf.constant(n - 1, tf.int64))
      return process_index + process_count * local
    return index

  def _element(self, index, position):
    example = dict(self._load(index))
    example["_index"] = index
    example["_position"] = position
    return example

  def train_dataset(self, process_index, process_count, seed, start_position):
    index = self._train_index_fn(process_index, process_count, seed)
    positions = tf.data.Dataset.counter(start=start_position, dtype=tf.int64)
    return positions.map(lambda p: self._element(index(p), p),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def eval_dataset(self, process_index, process_count):
    n = self.local_count(process_index, process_count)
    positions = tf.data.Dataset.range(n)
    return positions.map(
        lambda p: self._element(process_index + process_count * p, p),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def train_indices(self, process_index, process_count, seed, positions):
    index = self._train_index_fn(process_index, process_count, seed)
    return np.asarray([int(index(tf.constant(int(q), tf.int64))) for q in positions], np.int64)

  def eval_indices(self, process_index, process_count, positions):
    return process_index + process_count * np.asarray(positions, np.int64)

  def find_corrupt(self, indices):
    if self._check is None:
      return []
    return [name for name in (self._check(int(i)) for i in indices) if name]


def in_memory_split(images: np.ndarray, labels: np.ndarray, check=None) -> RandomAccessSplit:
  """A split held in memory: uint8 image arrays (N, H, W, C) or encoded bytes (N,)."""
  images_t = tf.constant(images)
  labels_t = tf.constant(np.asarray(labels, np.int64))

  def load(i):
    return {"image": tf.gather(images_t, i), "label": tf.gather(labels_t, i)}
  return RandomAccessSplit(len(labels), load, check)


# --------------------------------------------------------------------------------------------
# Sources.


class Source(abc.ABC):
  """An opened data set: class names and its splits."""

  name: str
  num_classes: int
  class_names: list[str] | None
  image_shape: tuple[int, int, int] | None = None

  @abc.abstractmethod
  def num_examples(self, split: str) -> int:
    """Size of ``split`` without reading it."""

  @abc.abstractmethod
  def split(self, split: str) -> Split:
    """Opens ``split`` for reading (cached)."""

  def info(self, splits) -> DatasetInfo:
    return DatasetInfo(name=self.name, num_classes=self.num_classes,
                       class_names=self.class_names,
                       num_examples={s: self.num_examples(s) for s in splits if s},
                       image_shape=self.image_shape)


class TfdsSource(Source):
  """A prepared tfds data set (``digits`` is prepared on first use)."""

  def __init__(self, name: str, data_dir: str | None, in_memory_max_bytes: int,
               shuffle_buffer: int | None = None):
    self.name = name
    self._shuffle_buffer = shuffle_buffer
    self._builder = tfds_source.open_builder(name, data_dir)
    info = self._builder.info
    self._image_key, self._label_key = info.supervised_keys or ("image", "label")
    features = info.features
    if self._image_key not in features or self._label_key not in features:
      raise ValueError(f"tfds data set {name!r} has features {list(features)}; an image "
                       "classification set with 'image' and 'label' features is needed")
    label = features[self._label_key]
    if not isinstance(label, tfds.features.ClassLabel):
      raise ValueError(f"tfds data set {name!r}: feature {self._label_key!r} is not a ClassLabel")
    self.num_classes = label.num_classes
    self.class_names = list(label.names) if label.names else None
    shape = tuple(features[self._image_key].shape)
    self.image_shape = shape if all(isinstance(d, int) for d in shape) else None
    self._in_memory_max_bytes = in_memory_max_bytes
    self._splits: dict[str, Split] = {}
    self._lock = threading.Lock()

  def num_examples(self, split):
    try:
      return int(self._builder.info.splits[split].num_examples)
    except (KeyError, ValueError) as e:
      raise ValueError(f"bad split {split!r} for tfds data set {self.name!r} (splits: "
                       f"{list(self._builder.info.splits)}): {e}") from None

  def split(self, split):
    with self._lock:
      if split not in self._splits:
        self._splits[split] = self._open(split)
      return self._splits[split]

  def _open(self, split) -> Split:
    info = self._builder.info.splits[split]
    n = int(info.num_examples)
    decoded = n * int(np.prod(self.image_shape)) if self.image_shape else None
    if decoded is not None and decoded <= self._in_memory_max_bytes:
      return self._load_in_memory(split, decode=True)
    if int(info.num_bytes) <= self._in_memory_max_bytes:
      return self._load_in_memory(split, decode=False)
    from mixer_vit.data import tfds_stream  # pylint: disable=g-import-not-at-top
    return tfds_stream.StreamSplit(self._builder, split, self._image_key, self._label_key,
                                   self._shuffle_buffer or tfds_stream.DEFAULT_BLOCK)

  def _load_in_memory(self, split, decode: bool) -> Split:
    decoders = None if decode else {self._image_key: tfds.decode.SkipDecoding()}
    ds = self._builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                  read_config=tfds.ReadConfig(try_autocache=False))
    ds = ds.map(lambda x: (x[self._image_key], x[self._label_key]))
    images, labels = [], []
    for image, label in ds.batch(1024).prefetch(2).as_numpy_iterator():
      images.append(image)
      labels.append(label)
    images = np.concatenate(images) if images else np.zeros((0,) + (self.image_shape or ()))
    labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    logging.info("Loaded %s[%s] into memory: %d examples, %.1f MB (%s)", self.name, split,
                 len(labels), images.nbytes / 2**20, "decoded" if decode else "encoded")
    return in_memory_split(images, labels)


def is_folder(dataset: str) -> bool:
  """A path (``folder:X``, absolute, ``./``, ``~``, or an existing directory) -> image folder."""
  if dataset.startswith("folder:"):
    return True
  if dataset.startswith(("/", "./", "../", "~", "gs://")):
    return True
  return os.path.isdir(dataset) and (
      os.path.isdir(os.path.join(dataset, "train")) or os.path.isdir(os.path.join(dataset, "test")))


_SOURCES: dict[tuple, Source] = {}
_SOURCES_LOCK = threading.Lock()


def get_config_value(config: Any, key: str, default: Any = None) -> Any:
  """``config.key`` for ConfigDicts, dicts and plain objects, else ``default``."""
  if isinstance(config, Mapping) or hasattr(config, "get"):
    value = config.get(key, default)
  else:
    value = getattr(config, key, default)
  return default if value is None else value


def open_source(config: Any) -> Source:
  """The source named by ``config.dataset`` (cached per process)."""
  dataset = get_config_value(config, "dataset")
  if not dataset:
    raise ValueError("config.dataset is not set; use 'digits' (offline), a tfds name such as "
                     "'mnist', or an image folder path")
  dataset = str(dataset)
  data_dir = get_config_value(config, "data_dir")
  skip_corrupt = bool(get_config_value(config, "skip_corrupt", False))
  max_bytes = int(float(get_config_value(config, "in_memory_max_mb", DEFAULT_IN_MEMORY_MB))
                  * 2**20)
  shuffle_buffer = int(get_config_value(config, "shuffle_buffer", 0))
  key = (dataset, data_dir, skip_corrupt, max_bytes, shuffle_buffer)
  with _SOURCES_LOCK:
    if key not in _SOURCES:
      if is_folder(dataset):
        from mixer_vit.data import folder  # pylint: disable=g-import-not-at-top
        root = dataset[len("folder:"):] if dataset.startswith("folder:") else dataset
        _SOURCES[key] = folder.ImageFolder(root, skip_corrupt=skip_corrupt,
                                           in_memory_max_bytes=max_bytes)
      else:
        _SOURCES[key] = TfdsSource(dataset, data_dir, max_bytes, shuffle_buffer)
    return _SOURCES[key]


def clear_cache() -> None:
  """Forgets opened sources (tests; data sets prepared or changed while running)."""
  with _SOURCES_LOCK:
    _SOURCES.clear()


__all__ = ["DatasetInfo", "Split", "RandomAccessSplit", "Source", "TfdsSource", "open_source",
           "in_memory_split", "is_folder", "clear_cache"]
