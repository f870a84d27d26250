"""Training and evaluation batches: per-process reading, preprocessing, global device arrays.

Each process reads its own disjoint part of a split (see ``sources``), preprocesses it with the
split's pp string, batches ``global_batch / process_count`` examples and hands them to
``parallel.shard_batch``, which assembles the global ``jax.Array`` laid out over the mesh. The
local batch therefore depends on the number of processes but never on the number of devices.

Training: the example at stream position ``q`` of process ``p`` and its random augmentation are
functions of (seed, p, q) only, and step ``s`` holds positions ``[s*B, (s+1)*B)``; so
``start_step=s`` continues exactly where an uninterrupted run would be. Mixup and CutMix
(``config.mixup`` / ``config.cutmix``, see ``mix``) mix each local batch with randomness from
(seed, p, s), so they keep both properties.

Evaluation (never mixed): every example of the split is read once; the last batch is padded with
zero images whose ``mask`` is False, and all processes yield the same number of batches.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
import math
from typing import Any

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from mixer_vit.data import base
from mixer_vit.data import folder
from mixer_vit.data import mix
from mixer_vit.data import preprocess
from mixer_vit.data import sources
from mixer_vit.data.folder import CorruptImageError
from mixer_vit.runtime import parallel

RNG_SALT = 0xA06A1E


def get_info(config: Any) -> base.DatasetInfo:
  """Class count, class names and the sizes of ``config.train_split`` and ``config.test_split``.

  ``config``: the training config (ConfigDict or dict) or a ``DataConfig``, as for every
  function here.
  """
  config = base.DataConfig.from_config(config)
  return sources.open_source(config).info([config.train_split, config.test_split])


# Ops whose output size does not follow the input's: images of several sizes batch after them.
_SIZING_OPS = frozenset(
  {
    'resize',
    'resize_small',
    'central_crop',
    'random_crop',
    'inception_crop',
    'decode_jpeg_and_inception_crop',
  }
)


def check_image_sizes(config: Any) -> None:
  """Image folders only: every image of the train and the test split has the same size, unless
  the split's preprocessing (``pp_train`` / ``pp_test``) resizes or crops; read from the file
  headers before training starts. Raises ValueError naming a file of another size and the fix."""
  config = base.DataConfig.from_config(config)
  source = sources.open_source(config)
  if not isinstance(source, folder.ImageFolder):
    return
  for split, key in ((config.train_split, 'pp_train'), (config.test_split, 'pp_test')):
    pp = getattr(config, key)
    if pp is None or any(name in _SIZING_OPS for name, _, _ in preprocess.parse(pp)):
      continue
    source.check_one_size(split, f'config.{key}', pp)


def _options(config: base.DataConfig, autotune: bool = True) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = config.threads
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = autotune
  return options


def _example_fn(
  pp: str,
  num_classes: int,
  seed: int,
  process_index: int,
  with_ids: bool,
  max_pixels: int,
  load=None,
):
  """Element of a split -> preprocessed ``{'image', 'labels'}`` with its per-example seed.

  ``load`` (the split's) runs first, in the same map: one map per example, not two.
  """
  pp_fn = preprocess.get_preprocess_fn(pp, num_classes=num_classes, max_pixels=max_pixels)
  if 'value_range' not in [name for name, _, _ in preprocess.parse(pp)]:
    raise ValueError(
      f'preprocessing {pp!r} has no value_range op; the models expect images in '
      '[-1, 1]: add value_range(-1, 1) after the image ops'
    )
  process_key = tf.random.experimental.stateless_fold_in(
    tf.constant([seed, RNG_SALT], tf.int64), process_index
  )

  deterministic = preprocess.is_deterministic(pp)

  def fn(example):
    if load is not None:
      example = load(example)
    inputs = {'image': example['image'], 'label': example['label']}
    if not deterministic:  # Evaluation's ops draw nothing: no seed to compute.
      inputs['_rng'] = tf.random.experimental.stateless_fold_in(process_key, example['_position'])
    out = pp_fn(inputs)
    image, labels = out.get('image'), out.get('labels')
    if image is None or image.dtype != tf.float32 or image.shape.rank != 3:
      raise ValueError(
        f"preprocessing {pp!r} must give a float32 (H, W, C) 'image', got "
        f'{image!r}; end the image ops with value_range(-1, 1)'
      )
    if labels is None or labels.shape.rank != 1:
      raise ValueError(f"preprocessing {pp!r} must give one-hot 'labels'; add 'onehot'")
    result = {'image': image, 'labels': labels}
    if with_ids:
      result['index'] = example['_index']
    return result

  return fn


def local_train_dataset(
  config: Any,
  process_index: int,
  process_count: int,
  local_batch_size: int,
  start_step: int = 0,
  with_ids: bool = False,
) -> tf.data.Dataset:
  """This process's endless stream of training batches (numpy-side; no devices involved)."""
  config = base.DataConfig.from_config(config)
  source = sources.open_source(config)
  split = source.split(config.train_split)
  seed = config.seed
  ds = split.train_elements(process_index, process_count, seed, start_step * local_batch_size)
  ds = ds.map(
    _example_fn(
      config.require('pp_train'),
      source.num_classes,
      seed,
      process_index,
      with_ids,
      config.max_image_pixels,
      split.load,
    ),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  ds = ds.batch(local_batch_size, drop_remainder=True)
  if config.mixes:  # Element k is the batch of step start_step + k.
    ds = ds.enumerate(start=start_step).map(
      mix.batch_fn(config, process_index), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
  ds = ds.prefetch(config.prefetch or tf.data.AUTOTUNE)
  # No autotuning for the long-lived training stream: releasing an autotuned iterator after a run
  # waited 32-38 s, idle, at the end of every digits run (TF 2.21). Without it AUTOTUNE means the
  # thread pool's size, and the digits job trained as fast (96.8 s against 94.6 s, one run each).
  return ds.with_options(_options(config, autotune=False))


def local_eval_dataset(
  config: Any,
  process_index: int,
  process_count: int,
  local_batch_size: int,
  split: str | None = None,
  with_ids: bool = False,
) -> tf.data.Dataset:
  """This process's part of the evaluation split, batched, last batch partial (not padded)."""
  config = base.DataConfig.from_config(config)
  source = sources.open_source(config)
  split_name = split or config.test_split
  pp = config.require('pp_test')
  if not preprocess.is_deterministic(pp):
    raise ValueError(
      f'pp_test {pp!r} has random ops; evaluation must be deterministic (use '
      'e.g. resize/central_crop instead of inception_crop/flip_lr)'
    )
  split_data = source.split(split_name)
  ds = split_data.eval_elements(process_index, process_count)
  ds = ds.map(
    _example_fn(
      pp, source.num_classes, 0, process_index, with_ids, config.max_image_pixels, split_data.load
    ),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  ds = ds.batch(local_batch_size).prefetch(config.prefetch or tf.data.AUTOTUNE)
  return ds.with_options(_options(config))


def _device_prefetch(batches: Iterator[dict], mesh, size: int) -> Iterator[dict]:
  """Puts the next ``size`` batches on the devices while the current one is used."""
  queue = collections.deque()
  for batch in batches:
    queue.append(parallel.shard_batch(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _corrupt_error(split, indices, error) -> Exception:
  bad = split.find_corrupt(indices) if indices is not None else []
  if not bad:
    return error
  return CorruptImageError(
    f'cannot decode image file(s): {"; ".join(bad)}. Fix or remove them, or set '
    'config.skip_corrupt=True to leave corrupt files out (they are then counted in the log).'
  )


class TrainIterator:
  """Endless iterator of global training batches ``{'image', 'labels'}`` from ``start_step``."""

  def __init__(self, config: Any, mesh: jax.sharding.Mesh, start_step: int = 0):
    config = base.DataConfig.from_config(config)
    self.config = config
    self.process_index, self.process_count = parallel.process_shard(mesh)
    self.local_batch_size = parallel.process_batch_size(config.require('batch_size'), mesh)
    self.seed = config.seed
    self.step = int(start_step)  # The step of the next batch.
    self._split = sources.open_source(config).split(config.train_split)
    ds = local_train_dataset(
      config, self.process_index, self.process_count, self.local_batch_size, start_step=self.step
    )
    self._batches = _device_prefetch(
      self._numpy_batches(ds.as_numpy_iterator()), mesh, config.device_prefetch
    )

  def _numpy_batches(self, it):
    step = self.step
    while True:
      try:
        batch = next(it)
      except tf.errors.OpError as e:
        b = self.local_batch_size
        indices = self._split.train_indices(
          self.process_index, self.process_count, self.seed, np.arange(step * b, (step + 1) * b)
        )
        raise _corrupt_error(self._split, indices, e) from e
      step += 1
      yield batch

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = next(self._batches)
    self.step += 1
    return batch

  def close(self) -> None:
    """Releases the tf.data iterator and its threads now, not at some later garbage collection
    (the generators refer back to this object, so only the cycle collector would free them)."""
    self._batches.close()


class EvalIterable:
  """One full pass per ``iter()``: global batches ``{'image', 'labels', 'mask'}``.

  Attributes:
    num_examples: examples in the split (over all processes); the masks add up to it.
    num_batches: batches per pass, the same in every process.
    last_count: examples with mask True that this process yielded in its last complete pass.
  """

  def __init__(
    self,
    config: Any,
    mesh: jax.sharding.Mesh,
    split: str | None = None,
    process: tuple[int, int] | None = None,
  ):
    """``process=(index, count)`` simulates one process of several (tests; ``local_batches``)."""
    config = base.DataConfig.from_config(config)
    self.config = config
    self._mesh = mesh
    self.split_name = split or config.test_split
    batch_size = config.global_eval_batch_size
    self.local_batch_size = parallel.process_batch_size(batch_size, mesh)
    self.process_index, self.process_count = parallel.process_shard(mesh)
    if process is not None:
      self.process_index, self.process_count = process
      if batch_size % self.process_count:
        raise ValueError(
          f'eval batch size {batch_size} is not divisible by {self.process_count} processes'
        )
      self.local_batch_size = batch_size // self.process_count
    self._split = sources.open_source(config).split(self.split_name)
    self.num_examples = self._split.num_examples
    largest = math.ceil(self.num_examples / self.process_count)
    self.num_batches = math.ceil(largest / self.local_batch_size)
    self.last_count = None
    self._dataset = None

  def __len__(self) -> int:
    return self.num_batches

  def local_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's padded numpy batches (what ``__iter__`` shards over the mesh)."""
    if self._dataset is None:  # Built once; each pass iterates it anew.
      self._dataset = local_eval_dataset(
        self.config,
        self.process_index,
        self.process_count,
        self.local_batch_size,
        split=self.split_name,
      )
    ds = self._dataset
    spec = ds.element_spec
    b = self.local_batch_size
    it = ds.as_numpy_iterator()
    template, count = None, 0
    for i in range(self.num_batches):
      try:
        batch = next(it, None)
      except tf.errors.OpError as e:
        indices = self._split.eval_indices(
          self.process_index, self.process_count, np.arange(i * b, (i + 1) * b)
        )
        indices = indices[indices < self.num_examples] if indices is not None else None
        raise _corrupt_error(self._split, indices, e) from e
      if batch is None:
        if template is None:
          template = {
            k: np.zeros((b,) + tuple(s.shape[1:]), s.dtype.as_numpy_dtype) for k, s in spec.items()
          }
        yield {**template, 'mask': np.zeros((b,), bool)}
        continue
      n = len(batch['labels'])
      count += n
      if n < b:
        batch = {
          k: np.concatenate([v, np.zeros((b - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()
        }
      template = {k: np.zeros_like(v) for k, v in batch.items()}
      yield {**batch, 'mask': np.arange(b) < n}
    if next(it, None) is not None:
      raise AssertionError('evaluation pass longer than computed; please report this bug')
    self.last_count = count
    logging.info(
      'Evaluated %d examples of %s in process %d of %d',
      count,
      self.split_name,
      self.process_index,
      self.process_count,
    )

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return _device_prefetch(self.local_batches(), self._mesh, self.config.device_prefetch)


def make_train_iterator(config: Any, mesh: jax.sharding.Mesh, start_step: int = 0) -> TrainIterator:
  """Endless global training batches; batch ``s`` depends only on (seed, s, process count)."""
  return TrainIterator(config, mesh, start_step)


def make_eval_iterator(
  config: Any, mesh: jax.sharding.Mesh, split: str | None = None
) -> EvalIterable:
  """One exact pass over the evaluation split per iteration (padded, with ``mask``)."""
  return EvalIterable(config, mesh, split)
