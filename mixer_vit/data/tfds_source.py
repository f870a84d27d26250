"""tfds data sets: find the prepared copy in ``data_dir`` and open it without any network access.

``tfds.load`` of a data set that is not prepared starts a download and, without network, retries
for minutes. Here the prepared directory ``<data_dir>/<name>[/<config>]/<version>`` is looked up
first and read with ``tfds.builder_from_directory`` (no registry, no network). When it is missing,
a download is tried only if the network answers within a few seconds; otherwise a
``NotPreparedError`` says at once how to prepare the data set. A name that tfds does not know
either (checked in tfds's registry, offline) gives an ``UnknownDatasetError`` that suggests the
closest known names instead.

``TfdsSource`` reads a split into memory when it fits ``in_memory_max_mb`` (decoded when the
images have one shape and the decoded split fits, else encoded) and otherwise streams it from
its files (``tfds_stream``).
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import threading
import urllib.parse

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_vit.data import base
from mixer_vit.data import digits
from mixer_vit.data import tfds_stream

_VERSION_RE = re.compile(r'^\d+\.\d+\.\d+$')
_PROBE_HOST = ('storage.googleapis.com', 443)
_PROBE_TIMEOUT_S = 3.0


class NotPreparedError(FileNotFoundError):
  """The tfds data set is not in data_dir and cannot be downloaded now."""


class UnknownDatasetError(NotPreparedError):
  """The data set name is neither a tfds data set nor prepared in data_dir (a typo?)."""


def default_data_dir(data_dir: str | None = None) -> str:
  """``data_dir``, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds's own default)."""
  if data_dir:
    return os.path.expanduser(str(data_dir))
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def parse_name(name: str) -> tuple[str, str | None, str | None]:
  """``'name/config:1.2.3'`` -> ``('name', 'config', '1.2.3')``."""
  version = None
  if ':' in name:
    name, version = name.split(':', 1)
  config = None
  if '/' in name:
    name, config = name.split('/', 1)
  return name, config, version


def _versions(path: str) -> list[str]:
  """Prepared versions under ``path`` (directories holding dataset_info.json), newest first."""
  if not tf.io.gfile.isdir(path):
    return []
  found = [v.rstrip('/') for v in tf.io.gfile.listdir(path)]
  found = [
    v
    for v in found
    if _VERSION_RE.match(v) and tf.io.gfile.exists(os.path.join(path, v, 'dataset_info.json'))
  ]
  return sorted(found, key=lambda v: tuple(int(x) for x in v.split('.')), reverse=True)


def find_prepared(name: str, data_dir: str) -> str | None:
  """The prepared builder directory of ``name`` in ``data_dir``, or None."""
  base, config, version = parse_name(name)
  root = os.path.join(data_dir, base)
  if config is None and tf.io.gfile.isdir(root) and not _versions(root):
    configs = [
      c.rstrip('/')
      for c in tf.io.gfile.listdir(root)
      if _versions(os.path.join(root, c.rstrip('/')))
    ]
    if len(configs) == 1:
      config = configs[0]
    elif configs:
      try:  # The registered default config, when tfds knows the data set (no network needed).
        cls = tfds.builder_cls(base)
        config = getattr(cls, 'DEFAULT_BUILDER_CONFIG_NAME', None) or cls.BUILDER_CONFIGS[0].name
      except Exception:  # pylint: disable=broad-except
        raise ValueError(
          f'tfds data set {base!r} in {data_dir} has several configs '
          f"{sorted(configs)}; name one, e.g. '{base}/{sorted(configs)[0]}'"
        ) from None
  if config is not None:
    root = os.path.join(root, config)
  versions = _versions(root)
  if version is not None:
    versions = [v for v in versions if v == version]
  return os.path.join(root, versions[0]) if versions else None


def _probe_address() -> tuple[str, int]:
  """Google Cloud Storage, or the HTTPS proxy when one is configured."""
  proxy = os.environ.get('https_proxy') or os.environ.get('HTTPS_PROXY')
  if proxy:
    parsed = urllib.parse.urlsplit(proxy if '://' in proxy else 'http://' + proxy)
    if parsed.hostname:
      return parsed.hostname, parsed.port or 80
  return _PROBE_HOST


def network_reachable(timeout: float = _PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to GCS (or the proxy) opens within ``timeout`` (DNS included)."""
  result = []
  address = _probe_address()

  def probe():
    try:
      with socket.create_connection(address, timeout=timeout):
        result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout + 0.5)
  return bool(result and result[0])


def _not_prepared_message(name: str, data_dir: str) -> str:
  base = parse_name(name)[0]
  lines = [
    f'tfds data set {name!r} is not prepared in data_dir {data_dir!r} (no '
    f'{os.path.join(data_dir, base)}/[<config>/]<version>/dataset_info.json) and the network is '
    'not reachable, so it cannot be downloaded.',
    'Prepare it once on a machine with network access and copy the folder '
    f'{os.path.join(data_dir, base)} here:',
    f'  tfds build {name} --data_dir={data_dir}',
    'or point --config.data_dir (or $TFDS_DATA_DIR) to a directory that has it.',
  ]
  if base == 'mnist':
    lines.append(
      'MNIST from its four idx files (train-images-idx3-ubyte.gz, ...): '
      f'python -m mixer_vit.data.mnist_idx --idx_dir=DIR --data_dir={data_dir}'
    )
  lines.append(
    'For an image folder ROOT/train/<class>/*, ROOT/test/<class>/* use '
    '--config.dataset=/path/to/ROOT; the offline default is --config.dataset=digits.'
  )
  return ' '.join(lines)  # One line.


def is_registered(name: str) -> bool:
  """Whether tfds has a builder for the data set of ``name`` (its registry; no network)."""
  try:
    tfds.builder_cls(parse_name(name)[0])
  except ValueError:  # tfds's DatasetNotFoundError, or not a valid name.
    return False
  except Exception:  # pylint: disable=broad-except  # Known, but its module fails to import.
    return True
  return True


def _names_in(data_dir: str) -> list[str]:
  """The folders in ``data_dir`` (the data sets prepared there), without tfds's own."""
  try:
    entries = tf.io.gfile.listdir(data_dir) if tf.io.gfile.isdir(data_dir) else []
  except tf.errors.OpError:
    return []
  names = [e.rstrip('/') for e in entries]
  return [
    n
    for n in names
    if n not in ('downloads', 'manual') and tf.io.gfile.isdir(os.path.join(data_dir, n))
  ]


def similar_names(name: str, data_dir: str, count: int = 5) -> list[str]:
  """The known data set names closest to ``name``: tfds's, ``digits`` and those in data_dir."""
  base = parse_name(name)[0]
  candidates = {n.lower(): n for n in tfds.list_builders(with_community_datasets=False)}
  candidates.update({n.lower(): n for n in [digits.NAME, *_names_in(data_dir)]})
  close = difflib.get_close_matches(base.lower(), list(candidates), n=count, cutoff=0.6)
  return [candidates[n] for n in close]


def _unknown_message(name: str, data_dir: str) -> str:
  base = parse_name(name)[0]
  similar = similar_names(name, data_dir)
  lines = [
    f'unknown data set {name!r}: tfds has no data set named {base!r} and data_dir '
    f'{data_dir!r} has no prepared copy of it.'
  ]
  if similar:
    lines.append(f'Did you mean {" or ".join(repr(n) for n in similar)}?')
  else:
    lines.append(
      "No known name is close; python -c 'import tensorflow_datasets as tfds; "
      "print(tfds.list_builders())' lists the tfds data sets."
    )
  if os.path.isdir(os.path.expanduser(name)):
    lines.append(f'{name} is a folder, but it has no train/ or test/ folder of classes.')
  lines.append(
    'An image folder ROOT/train/<class>/*, ROOT/test/<class>/* is given as a path: '
    '--config.dataset=/path/to/ROOT (or ./ROOT, ~/ROOT, folder:ROOT); the offline default is '
    '--config.dataset=digits.'
  )
  return ' '.join(lines)  # One line.


def open_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """A read-only builder of the prepared data set; prepares ``digits``; fails fast otherwise."""
  data_dir = default_data_dir(data_dir)
  path = find_prepared(name, data_dir)
  if path is None and parse_name(name)[0] == digits.NAME:
    logging.info('Preparing the bundled digits data set in %s', data_dir)
    path = digits.prepare(data_dir)
  if path is None and not is_registered(name):
    raise UnknownDatasetError(_unknown_message(name, data_dir))
  if path is None:
    if not network_reachable():
      raise NotPreparedError(_not_prepared_message(name, data_dir))
    logging.info('tfds data set %s is not in %s; downloading and preparing it', name, data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    path = str(builder.data_dir)
  return tfds.builder_from_directory(path)


# --------------------------------------------------------------------------------------------
# The source.


class TfdsSource(base.Source):
  """A prepared tfds data set (``digits`` is prepared on first use)."""

  def __init__(
    self,
    name: str,
    data_dir: str | None,
    in_memory_max_bytes: int,
    shuffle_buffer: int | None = None,
  ):
    self.name = name
    self._shuffle_buffer = shuffle_buffer
    self._builder = open_builder(name, data_dir)
    info = self._builder.info
    self._image_key, self._label_key = info.supervised_keys or ('image', 'label')
    features = info.features
    if self._image_key not in features or self._label_key not in features:
      raise ValueError(
        f'tfds data set {name!r} has features {list(features)}; an image '
        "classification set with 'image' and 'label' features is needed"
      )
    label = features[self._label_key]
    if not isinstance(label, tfds.features.ClassLabel):
      raise ValueError(f'tfds data set {name!r}: feature {self._label_key!r} is not a ClassLabel')
    self.num_classes = label.num_classes
    self.class_names = list(label.names) if label.names else None
    shape = tuple(features[self._image_key].shape)
    self.image_shape = shape if all(isinstance(d, int) for d in shape) else None
    self._in_memory_max_bytes = in_memory_max_bytes

  def num_examples(self, split):
    try:
      return int(self._builder.info.splits[split].num_examples)
    except (KeyError, ValueError) as e:
      raise ValueError(
        f'bad split {split!r} for tfds data set {self.name!r} (splits: '
        f'{list(self._builder.info.splits)}): {e}'
      ) from None

  def _open(self, split) -> base.Split:
    info = self._builder.info.splits[split]
    n = int(info.num_examples)
    decoded = n * int(np.prod(self.image_shape)) if self.image_shape else None
    if decoded is not None and decoded <= self._in_memory_max_bytes:
      return self._load_in_memory(split, decode=True)
    if int(info.num_bytes) <= self._in_memory_max_bytes:
      return self._load_in_memory(split, decode=False)
    return tfds_stream.StreamSplit(
      self._builder,
      split,
      self._image_key,
      self._label_key,
      self._shuffle_buffer or tfds_stream.DEFAULT_BLOCK,
    )

  def _load_in_memory(self, split, decode: bool) -> base.Split:
    decoders = None if decode else {self._image_key: tfds.decode.SkipDecoding()}
    ds = self._builder.as_dataset(
      split=split,
      shuffle_files=False,
      decoders=decoders,
      read_config=tfds.ReadConfig(try_autocache=False),
    )
    ds = ds.map(lambda x: (x[self._image_key], x[self._label_key]))
    images, labels = [], []
    for image, label in ds.batch(1024).prefetch(2).as_numpy_iterator():
      images.append(image)
      labels.append(label)
    images = np.concatenate(images) if images else np.zeros((0,) + (self.image_shape or ()))
    labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    logging.info(
      'Loaded %s[%s] into memory: %d examples, %.1f MB (%s)',
      self.name,
      split,
      len(labels),
      images.nbytes / 2**20,
      'decoded' if decode else 'encoded',
    )
    return base.in_memory_split(images, labels)
