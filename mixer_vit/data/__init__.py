"""Input pipelines: data sets, preprocessing ops, batches laid out over the device mesh.

Public API (see README, section Data):
  get_info(config) -> DatasetInfo
  make_train_iterator(config, mesh, start_step=0) -> endless global batches {'image', 'labels'}
  make_eval_iterator(config, mesh, split=None) -> one exact pass {'image', 'labels', 'mask'}
  preprocess.get_preprocess_fn(pp, num_classes=None) -> example dict -> example dict
"""

from mixer_vit.data import preprocess
from mixer_vit.data.folder import CorruptImageError
from mixer_vit.data.pipeline import EvalIterable
from mixer_vit.data.pipeline import TrainIterator
from mixer_vit.data.pipeline import get_info
from mixer_vit.data.pipeline import local_eval_dataset
from mixer_vit.data.pipeline import local_train_dataset
from mixer_vit.data.pipeline import make_eval_iterator
from mixer_vit.data.pipeline import make_train_iterator
from mixer_vit.data.sources import DatasetInfo
from mixer_vit.data.tfds_source import NotPreparedError

__all__ = [
    "CorruptImageError", "DatasetInfo", "EvalIterable", "NotPreparedError", "TrainIterator",
    "get_info", "local_eval_dataset", "local_train_dataset", "make_eval_iterator",
    "make_train_iterator", "preprocess",
]
