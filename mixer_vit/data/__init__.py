"""Input pipelines: data sets, preprocessing ops, batches laid out over the device mesh.

Public API (see README, section Data); ``config`` is the training config (a ConfigDict or a dict,
read once into a ``DataConfig``) or a ``DataConfig``:
  get_info(config) -> DatasetInfo
  check_image_sizes(config): image folders' sizes agree where the preprocessing does not resize
  make_train_iterator(config, mesh, start_step=0) -> endless global batches {'image', 'labels'}
  make_eval_iterator(config, mesh, split=None) -> one exact pass {'image', 'labels', 'mask'}
  preprocess.get_preprocess_fn(pp, num_classes=None, max_pixels=None) -> example -> example

Modules, each importing only those before it:
  base          DataConfig, DatasetInfo, Split, Source: what the others share
  digits        the bundled offline digits set, written in tfds format on first use
  tfds_stream   streaming reads of tfds splits too big for memory
  tfds_source   finding prepared tfds sets without network; TfdsSource
  images        image sizes from file headers; decoding under a limit on pixels
  folder        image folders ROOT/<split>/<class>/*.jpg
  sources       open_source(config): picks the source for config.dataset
  randaug       RandAugment's image functions (the op randaug of preprocess)
  preprocess    the preprocessing ops and pp strings
  mix           mixup and CutMix of training batches
  pipeline      per-process datasets and global batches
  benchmark, mnist_idx   command-line tools
"""

from mixer_vit.data import preprocess
from mixer_vit.data import sources
from mixer_vit.data.base import DataConfig
from mixer_vit.data.base import DatasetInfo
from mixer_vit.data.folder import CorruptImageError
from mixer_vit.data.pipeline import EvalIterable
from mixer_vit.data.pipeline import TrainIterator
from mixer_vit.data.pipeline import check_image_sizes
from mixer_vit.data.pipeline import get_info
from mixer_vit.data.pipeline import local_eval_dataset
from mixer_vit.data.pipeline import local_train_dataset
from mixer_vit.data.pipeline import make_eval_iterator
from mixer_vit.data.pipeline import make_train_iterator
from mixer_vit.data.tfds_source import NotPreparedError
from mixer_vit.data.tfds_source import UnknownDatasetError

__all__ = [
  'CorruptImageError',
  'DataConfig',
  'DatasetInfo',
  'EvalIterable',
  'NotPreparedError',
  'TrainIterator',
  'check_image_sizes',
  'UnknownDatasetError',
  'get_info',
  'local_eval_dataset',
  'local_train_dataset',
  'make_eval_iterator',
  'make_train_iterator',
  'preprocess',
  'sources',
]
