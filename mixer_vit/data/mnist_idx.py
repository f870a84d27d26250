"""MNIST from its four idx files, without a download: writes tfds's ``mnist`` into ``data_dir``.

    python -m mixer_vit.data.mnist_idx --idx_dir=DIR --data_dir=DATA_DIR

``DIR`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``). The result
is tfds's own ``mnist`` data set (same builder, version, features and splits: 60,000 train and
10,000 test images), so ``dataset='mnist'`` with that ``data_dir`` then works offline.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_vit.data import tfds_source

FILES = {
  'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
  'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def find_file(idx_dir: str, stem: str) -> str:
  """``idx_dir/stem.gz`` or ``idx_dir/stem``; a clear error when neither exists."""
  for name in (stem + '.gz', stem):
    path = os.path.join(idx_dir, name)
    if tf.io.gfile.exists(path):
      return path
  raise FileNotFoundError(
    f'{stem}[.gz] not found in {idx_dir!r}; it must hold the four MNIST idx '
    f'files: {", ".join(s for pair in FILES.values() for s in pair)}'
  )


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file of unsigned bytes (images: (N, rows, cols), labels: (N,))."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    raw = f.read()
  if raw[:2] == b'\x1f\x8b':
    raw = gzip.decompress(raw)
  if len(raw) < 8:
    raise ValueError(f'{path}: too short for an idx file')
  magic, count = struct.unpack('>II', raw[:8])
  if magic == _IMAGES_MAGIC:
    rows, cols = struct.unpack('>II', raw[8:16])
    shape, offset = (count, rows, cols), 16
  elif magic == _LABELS_MAGIC:
    shape, offset = (count,), 8
  else:
    raise ValueError(
      f'{path}: not an idx file of unsigned bytes (magic {magic:#010x}, expected '
      f'{_IMAGES_MAGIC:#010x} for images or {_LABELS_MAGIC:#010x} for labels)'
    )
  expected = int(np.prod(shape))
  if len(raw) - offset != expected:
    raise ValueError(
      f'{path}: header says {shape} ({expected} bytes), file has {len(raw) - offset} bytes of data'
    )
  return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def read_split(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, 28, 28) uint8, labels (N,) uint8) of ``split`` ('train' or 'test')."""
  images_stem, labels_stem = FILES[split]
  images = read_idx(find_file(idx_dir, images_stem))
  labels = read_idx(find_file(idx_dir, labels_stem))
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(
      f'{idx_dir}: {split} images {images.shape} and labels {labels.shape} do not match'
    )
  if labels.size and labels.max() > 9:
    raise ValueError(f'{idx_dir}: {split} labels go up to {labels.max()}; MNIST has 10 classes')
  return images, labels


class MnistFromIdx(tfds.image_classification.MNIST, skip_registration=True):
  """tfds's MNIST builder, fed from local idx files instead of the download."""

  name = 'mnist'

  def __init__(self, *, idx_dir: str, **kwargs):
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in FILES}

  def _generate_examples(self, split):  # pytype: disable=signature-mismatch
    images, labels = read_split(self._idx_dir, split)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': image[..., None], 'label': int(label)}


def prepare(idx_dir: str, data_dir: str | None = None) -> str:
  """Writes tfds ``mnist`` from the idx files in ``idx_dir``; returns the builder directory."""
  data_dir = tfds_source.default_data_dir(data_dir)
  for split in FILES:  # Fail on bad input before writing anything.
    read_split(idx_dir, split)
  builder = MnistFromIdx(idx_dir=idx_dir, data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  return str(builder.data_dir)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--idx_dir', required=True, help='folder with the four idx(.gz) files')
  parser.add_argument(
    '--data_dir',
    default=None,
    help='tfds data dir to write to (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)',
  )
  args = parser.parse_args(argv)
  path = prepare(args.idx_dir, args.data_dir)
  print(
    f'prepared tfds mnist in {path}; use --config.dataset=mnist '
    f'--config.data_dir={os.path.dirname(os.path.dirname(path))}'
  )


if __name__ == '__main__':
  main(sys.argv[1:])
