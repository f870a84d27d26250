"""The one place that picks a data set's source: an image folder or a tfds data set.

``open_source(DataConfig)`` opens ``dataset`` once per process (later calls with the same
settings get the same source, so splits read into memory are read once): a path (see
``is_folder``) is an image folder (``folder.ImageFolder``), anything else a tfds name
(``tfds_source.TfdsSource``; ``digits`` is written on first use).
"""

from __future__ import annotations

import os
import threading

from mixer_vit.data import base
from mixer_vit.data import folder
from mixer_vit.data import tfds_source

_SOURCES: dict[tuple, base.Source] = {}
_SOURCES_LOCK = threading.Lock()


def is_folder(dataset: str) -> bool:
  """A path (``folder:X``, absolute, ``./``, ``~``, or an existing directory) -> image folder."""
  if dataset.startswith('folder:'):
    return True
  if dataset.startswith(('/', './', '../', '~', 'gs://')):
    return True
  return os.path.isdir(dataset) and (
    os.path.isdir(os.path.join(dataset, 'train')) or os.path.isdir(os.path.join(dataset, 'test'))
  )


def open_source(config: base.DataConfig) -> base.Source:
  """The source named by ``config.dataset`` (cached per process)."""
  dataset = config.dataset
  max_bytes = config.in_memory_max_bytes
  key = (
    dataset,
    config.data_dir,
    config.skip_corrupt,
    max_bytes,
    config.shuffle_buffer,
    config.max_image_pixels,
  )
  with _SOURCES_LOCK:
    if key not in _SOURCES:
      if is_folder(dataset):
        root = dataset[len('folder:') :] if dataset.startswith('folder:') else dataset
        _SOURCES[key] = folder.ImageFolder(
          root,
          skip_corrupt=config.skip_corrupt,
          in_memory_max_bytes=max_bytes,
          max_pixels=config.max_image_pixels,
        )
      else:
        _SOURCES[key] = tfds_source.TfdsSource(
          dataset, config.data_dir, max_bytes, config.shuffle_buffer
        )
    return _SOURCES[key]
