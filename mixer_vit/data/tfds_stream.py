"""Streaming reads of tfds data sets too big for memory (e.g. ImageNet), with cheap exact resume.

Process ``p`` of ``P`` reads ``tfds.even_splits(split, P)[p]``: a contiguous, disjoint part. In
epoch ``e`` it reads its files in an order shuffled with the key (seed, p, e), and shuffles the
records in consecutive blocks of ``shuffle_buffer`` records, each block with its own key. (tfds
already shuffled the examples across files when it prepared the data set.)

Both shuffles are stateless, so the record at stream position ``q`` is known without reading
the records before it: resuming at position ``q`` opens the file that holds the start of ``q``'s
block, skips to that block (reading at most one file's records, undecoded) and then skips the
``q mod shuffle_buffer`` records of the block. Images are decoded later by the ``decode`` op.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_vit.data import base

DEFAULT_BLOCK = base.DEFAULT_SHUFFLE_BUFFER
_READ_BUFFER = 8 * 2**20


class StreamSplit(base.Split):
  """A tfds split read record by record from its TFRecord files."""

  def __init__(
    self,
    builder: tfds.core.DatasetBuilder,
    split: str,
    image_key: str,
    label_key: str,
    block_size: int = DEFAULT_BLOCK,
  ):
    info = builder.info
    if info.file_format != tfds.core.FileFormat.TFRECORD:
      raise ValueError(
        f'streaming {info.name} needs TFRecord files, it has {info.file_format}; '
        'raise config.in_memory_max_mb to read it into memory instead'
      )
    self._info = info
    self._split = split
    self._image_key, self._label_key = image_key, label_key
    self.num_examples = int(info.splits[split].num_examples)
    self.block_size = int(block_size)
    self._decoders = {image_key: tfds.decode.SkipDecoding()}

  def _instructions(self, process_index, process_count):
    """(files, skips, takes, first split index of each file's records) of one process."""
    subsplits = tfds.even_splits(self._split, n=process_count)
    start = sum(int(self._info.splits[s].num_examples) for s in subsplits[:process_index])
    files, skips, takes = [], [], []
    for fi in self._info.splits[subsplits[process_index]].file_instructions:
      take = fi.take if fi.take is not None and fi.take >= 0 else fi.examples_in_shard - fi.skip
      if take > 0:
        files.append(fi.filename)
        skips.append(fi.skip)
        takes.append(take)
    takes = np.asarray(takes, np.int64)
    first = start + np.concatenate([[0], np.cumsum(takes)[:-1]]).astype(np.int64)
    return (np.asarray(files), np.asarray(skips, np.int64), takes, first)

  def local_count(self, process_index, process_count):
    return int(self._instructions(process_index, process_count)[2].sum())

  @staticmethod
  def _read(files, skips, takes, first) -> tf.data.Dataset:
    """Records of the given file slices in order, with their split indices."""

    def one(f, s, t, i0):
      records = tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER).skip(s).take(t)
      return tf.data.Dataset.zip(records, tf.data.Dataset.range(i0, i0 + t))

    return tf.data.Dataset.from_tensor_slices((files, skips, takes, first)).flat_map(one)

  def load(self, element):
    """Parses the record (the image stays encoded; the ``decode`` op decodes it)."""
    example = self._info.features.deserialize_example(element['_record'], decoders=self._decoders)
    return {
      'image': example[self._image_key],
      'label': example[self._label_key],
      '_index': element['_index'],
      '_position': element['_position'],
    }

  @staticmethod
  def _elements(stream: tf.data.Dataset) -> tf.data.Dataset:
    return stream.map(lambda ri, q: {'_record': ri[0], '_index': ri[1], '_position': q})

  def train_elements(self, process_index, process_count, seed, start_position):
    files, skips, takes, first = self._instructions(process_index, process_count)
    n = int(takes.sum())
    if n == 0:
      raise ValueError(
        f'the training split has {self.num_examples} examples, fewer than the '
        f'{process_count} processes; use a bigger split'
      )
    block = min(self.block_size, n)
    files_t, skips_t, takes_t, first_t = (tf.constant(a) for a in (files, skips, takes, first))

    def epoch(e, start_block):
      """Records of epoch ``e`` from block ``start_block`` on, block-shuffled."""
      key = base.shuffle_key(seed, process_index, e)
      order = tf.random.experimental.stateless_shuffle(tf.range(len(files), dtype=tf.int64), key)
      t = tf.gather(takes_t, order)
      ends = tf.cumsum(t)
      start = tf.cast(start_block, tf.int64) * block
      f0 = tf.searchsorted(ends, [start], side='right')[0]
      into = start - (ends[f0] - t[f0])
      order = order[f0:]
      adjust = tf.concat([[into], tf.zeros([tf.size(order) - 1], tf.int64)], 0)
      records = self._read(
        tf.gather(files_t, order),
        tf.gather(skips_t, order) + adjust,
        tf.gather(takes_t, order) - adjust,
        tf.gather(first_t, order) + adjust,
      )
      blocks = records.batch(block).enumerate(start=tf.cast(start_block, tf.int64))

      def shuffle_block(b, rec_idx):
        rec, idx = rec_idx
        block_key = tf.random.experimental.stateless_fold_in(key, b)
        perm = tf.random.experimental.stateless_shuffle(tf.range(tf.size(idx)), block_key)
        return tf.data.Dataset.from_tensor_slices((tf.gather(rec, perm), tf.gather(idx, perm)))

      return blocks.flat_map(shuffle_block)

    e0, within = divmod(int(start_position), n)
    b0, r0 = divmod(within, block)
    first_epoch = epoch(tf.constant(e0, tf.int64), b0).skip(r0)
    later = tf.data.Dataset.counter(start=e0 + 1, dtype=tf.int64).flat_map(lambda e: epoch(e, 0))
    stream = first_epoch.concatenate(later)
    stream = tf.data.Dataset.zip(
      stream, tf.data.Dataset.counter(start=start_position, dtype=tf.int64)
    )
    return self._elements(stream)

  def eval_elements(self, process_index, process_count):
    files, skips, takes, first = self._instructions(process_index, process_count)
    records = (
      self._read(files, skips, takes, first)
      if len(files)
      else (
        tf.data.Dataset.from_tensor_slices((tf.constant([], tf.string), tf.constant([], tf.int64)))
      )
    )
    stream = tf.data.Dataset.zip(records, tf.data.Dataset.counter(dtype=tf.int64))
    return self._elements(stream)
