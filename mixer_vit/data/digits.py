"""The bundled offline data set: scikit-learn's 8x8 handwritten digits as a tfds data set.

scikit-learn ships the 1,797 images (the UCI "optdigits" test part, 10 classes, 4-bit grey
values 0..16) inside its wheel, so this set needs no network. On first use it is written in tfds
format to ``<data_dir>/digits/1.0.0`` (about 0.2 s) and read like any other tfds data set.

Fixed split: example ``i`` (in scikit-learn's order) goes to ``test`` when ``i % 6 == 5`` and to
``train`` otherwise, giving exactly 1,498 training and 299 test images. Pixels are scaled to
uint8 as ``round(v * 255 / 16)``; images are (8, 8, 1) grey.
"""

from __future__ import annotations

import numpy as np
from sklearn import datasets as sklearn_datasets
import tensorflow_datasets as tfds

NAME = 'digits'
VERSION = '1.0.0'
NUM_TRAIN = 1498
NUM_TEST = 299
NUM_CLASSES = 10


def _is_test(index: int) -> bool:
  return index % 6 == 5


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """scikit-learn's 8x8 digits with a fixed 1,498 / 299 train / test split."""

  name = NAME
  VERSION = tfds.core.Version(VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(8, 8, 1)),
          'label': tfds.features.ClassLabel(names=[str(i) for i in range(NUM_CLASSES)]),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data come with scikit-learn.
    return {
      'train': self._generate_examples(test=False),
      'test': self._generate_examples(test=True),
    }

  def _generate_examples(self, test: bool):
    digits = sklearn_datasets.load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    for index, (image, label) in enumerate(zip(images, digits.target)):
      if _is_test(index) == test:
        yield index, {'image': image, 'label': int(label)}


def prepare(data_dir: str) -> str:
  """Writes the digits set to ``data_dir`` unless it is there; returns its builder directory."""
  builder = Digits(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  return str(builder.data_dir)
