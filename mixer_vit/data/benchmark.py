"""Throughput of the input pipeline alone (no model), optionally against plain tf.data.

    python -m mixer_vit.data.benchmark --dataset=digits
    python -m mixer_vit.data.benchmark --dataset=/path/to/image_folder --resolution=224
    python -m mixer_vit.data.benchmark --dataset=/path/to/image_folder --resolution=224 --reference

Reads the training split with the training preprocessing (default:
``decode_jpeg_and_inception_crop(R)|flip_lr|value_range(-1,1)|onehot`` with R the data set's
native size or ``--resolution``; on decoded images that op is ``decode|inception_crop(R)``),
batches it as one process would, and times ``--batches`` batches after ``--warmup`` batches,
``--runs`` times. Prints each run and the median in images/s.

``--reference`` also times, in the same runs and alternating with ours, a hand-written plain
tf.data pipeline with the same ops and tf.data options, over the same stored data (the arrays
or files the split holds): ``from_tensor_slices``, ``shuffle``, ``repeat``, one map (training:
the fused JPEG decode-and-crop or the crop of a decoded image, resize, flip; evaluation: decode,
resize of the shorter side, central crop), batch, prefetch. It times the evaluation preprocessing
``decode|resize_small(S)|central_crop(R)|value_range(-1,1)|onehot`` (S = R * 256 / 224) the same
way, and prints ours / reference for both, per run and as the median of the per-run ratios: the
machine's load changes between runs, but hits both sides of one run alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import tensorflow as tf

from mixer_vit.data import base
from mixer_vit.data import pipeline
from mixer_vit.data import sources


def _native_size(config: base.DataConfig) -> tuple[int, int]:
  first = pipeline.local_eval_dataset(
    dataclasses.replace(config, pp_test='decode|value_range(-1,1)|onehot'),
    0,
    1,
    1,
    split=config.train_split,
  )
  image = next(first.as_numpy_iterator())['image']
  return image.shape[1], image.shape[2]


def train_pp(size: tuple[int, int]) -> str:
  """The default training preprocessing at output ``size``."""
  return f'decode_jpeg_and_inception_crop({size})|flip_lr|value_range(-1,1)|onehot'


def eval_pp(size: tuple[int, int]) -> str:
  """The default evaluation preprocessing at output ``size`` (shorter side to 256/224 of it)."""
  small = round(min(size) * 256 / 224)
  return f'decode|resize_small({small})|central_crop({size})|value_range(-1,1)|onehot'


# --------------------------------------------------------------------------------------------
# The plain tf.data reference.


def _reference_source(split: base.Split, num_classes: int):
  """(tf.data dataset of (image or encoded bytes, label), whether encoded) of a stored split."""
  storage = getattr(split, 'storage', None)
  if storage is None:
    raise ValueError(
      '--reference needs a split held in memory or as files (an image folder or a tfds set '
      'within in_memory_max_mb); this one is streamed'
    )
  kind, images, labels = storage
  del num_classes
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  if kind == 'files':
    ds = ds.map(lambda path, label: (tf.io.read_file(path), label))
  encoded = kind == 'files' or images.dtype == object
  return ds, encoded


def _reference_train_fn(size, num_classes: int, encoded: bool):
  """Random crop of 5-100 % of the area (aspect 3/4-4/3), resize, flip, [-1, 1], one-hot."""

  def window(shape):
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
      shape,
      tf.zeros([0, 0, 4], tf.float32),
      area_range=(0.05, 1.0),
      aspect_ratio_range=(3 / 4, 4 / 3),
      min_object_covered=0,
      use_image_if_no_bounding_boxes=True,
    )
    return begin, crop

  def fn(image, label):
    if encoded:
      begin, crop = window(tf.io.extract_jpeg_shape(image))
      image = tf.io.decode_and_crop_jpeg(
        image, tf.stack([begin[0], begin[1], crop[0], crop[1]]), channels=3
      )
    else:
      if image.shape.rank == 2:
        image = image[..., None]
      image = tf.slice(image, *window(tf.shape(image)))
      if image.shape[-1] == 1:
        image = tf.repeat(image, 3, axis=-1)
    image = tf.image.resize(image, size)
    image = tf.image.random_flip_left_right(image)
    return {'image': image / 127.5 - 1, 'labels': tf.one_hot(label, num_classes)}

  return fn


def _reference_eval_fn(size, num_classes: int, encoded: bool):
  """Decode, shorter side to 256/224 of the output, central crop, [-1, 1], one-hot."""
  small = round(min(size) * 256 / 224)

  def fn(image, label):
    if encoded:
      image = tf.io.decode_jpeg(image, channels=3)
    elif image.shape.rank == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = tf.repeat(image, 3, axis=-1)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new = tf.maximum(small, tf.cast(tf.round(hw * small / tf.reduce_min(hw)), tf.int32))
    image = tf.image.resize(image, new)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    image = image[top : top + size[0], left : left + size[1]]
    return {'image': image / 127.5 - 1, 'labels': tf.one_hot(label, num_classes)}

  return fn


def reference_dataset(
  config: base.DataConfig, split: str, size, batch_size: int, train: bool
) -> tf.data.Dataset:
  """The plain tf.data pipeline: endless batches of the training or evaluation preprocessing."""
  source = sources.open_source(config)
  stored = source.split(split)
  ds, encoded = _reference_source(stored, source.num_classes)
  if train:
    ds = ds.shuffle(min(stored.num_examples, config.shuffle_buffer), seed=config.seed).repeat()
    fn = _reference_train_fn(size, source.num_classes, encoded)
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    fn = _reference_eval_fn(size, source.num_classes, encoded)
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
  ds = ds.prefetch(config.prefetch or tf.data.AUTOTUNE)
  if not train:
    ds = ds.repeat()
  return ds.with_options(pipeline._options(config))


# --------------------------------------------------------------------------------------------
# Timing.


def _rate(ds: tf.data.Dataset, batches: int, warmup: int) -> tuple[float, float, tuple]:
  """Images/s and CPU ms/image over ``batches`` batches after ``warmup``; the images' shape.

  The CPU time (all threads of this process) is the steadier measure on a shared machine.
  """
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    next(it)
  count = 0
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = next(it)
    count += len(batch['labels'])
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  del it
  return count / elapsed, 1e3 * cpu / count, batch['image'].shape


def run(
  dataset: str,
  data_dir: str | None = None,
  resolution: int | None = None,
  batch_size: int = 256,
  batches: int = 20,
  warmup: int = 3,
  runs: int = 5,
  pp: str | None = None,
  threads: int = 0,
  split: str = 'train',
  reference: bool = False,
) -> dict:
  """Measures the pipeline; returns the per-run and median images/s (and the reference's)."""
  if reference and pp:
    raise ValueError('--reference times the default preprocessing; leave --pp out')
  config = base.DataConfig(
    dataset=dataset,
    data_dir=data_dir,
    train_split=split,
    test_split=split,
    seed=0,
    batch_size=batch_size,
    data_threads=threads,
  )
  start = time.perf_counter()
  info = pipeline.get_info(config)
  sources.open_source(config).split(split)  # Reads small sets into memory: timed separately.
  setup_s = time.perf_counter() - start
  native = _native_size(config)
  size = (resolution, resolution) if resolution else native
  config = dataclasses.replace(config, pp_train=pp or train_pp(size), pp_test=eval_pp(size))
  timed = {'train': lambda: pipeline.local_train_dataset(config, 0, 1, batch_size)}
  if reference:
    timed['reference_train'] = lambda: reference_dataset(config, split, size, batch_size, True)
    timed['eval'] = lambda: pipeline.local_eval_dataset(
      config, 0, 1, batch_size, split=split
    ).repeat()
    timed['reference_eval'] = lambda: reference_dataset(config, split, size, batch_size, False)
  rates = {name: [] for name in timed}
  cpu_ms = {name: [] for name in timed}
  for _ in range(runs):
    for name, make in timed.items():  # Alternating: each run times every pipeline once.
      rate, ms, shape = _rate(make(), batches, warmup)
      rates[name].append(rate)
      cpu_ms[name].append(ms)
  result = {
    'dataset': dataset,
    'examples': info.num_examples[split],
    'native': native,
    'size': tuple(shape[1:3]),
    'pp': config.pp_train,
    'threads': threads or os.cpu_count(),
    'setup_s': setup_s,
    'rates': rates['train'],
    'median': statistics.median(rates['train']),
  }
  if reference:
    result['pp_eval'] = config.pp_test
    result['all_rates'] = rates
    result['cpu_ms'] = cpu_ms
    for kind in ('train', 'eval'):
      ratios = [a / b for a, b in zip(rates[kind], rates[f'reference_{kind}'])]
      result[f'{kind}_ratios'] = ratios
      result[f'{kind}_ratio'] = statistics.median(ratios)
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--dataset', default='digits', help="'digits', a tfds name, or an image folder path"
  )
  parser.add_argument('--data_dir', default=None, help='tfds data dir')
  parser.add_argument(
    '--resolution', type=int, default=None, help="output size (default: the data set's native size)"
  )
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--batches', type=int, default=20, help='timed batches per run')
  parser.add_argument('--warmup', type=int, default=3, help='untimed batches per run')
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--pp', default=None, help='training pp string to time instead')
  parser.add_argument('--threads', type=int, default=0, help='tf.data threads (0: all cores)')
  parser.add_argument('--split', default='train')
  parser.add_argument(
    '--reference',
    action='store_true',
    help='also time a plain tf.data pipeline with the same ops, for training and evaluation '
    'preprocessing, and print ours / reference',
  )
  args = parser.parse_args(argv)
  result = run(
    args.dataset,
    args.data_dir,
    args.resolution,
    args.batch_size,
    args.batches,
    args.warmup,
    args.runs,
    args.pp,
    args.threads,
    args.split,
    args.reference,
  )
  print(
    f'dataset {result["dataset"]} ({result["examples"]} training examples, native '
    f'{result["native"][0]}x{result["native"][1]}), output {result["size"][0]}x'
    f'{result["size"][1]}, batch {args.batch_size}, {result["threads"]} threads'
  )
  print(f'pp: {result["pp"]}')
  print(f'setup (open + read into memory): {result["setup_s"]:.1f} s')
  print('runs (images/s): ' + ', '.join(f'{r:.0f}' for r in result['rates']))
  print(
    f'median of {len(result["rates"])} runs: {result["median"]:.0f} images/s '
    f'({args.batches} batches of {args.batch_size} per run after {args.warmup} warm-up)'
  )
  if args.reference:
    print(f'evaluation pp: {result["pp_eval"]}')
    rates = result['all_rates']
    for kind in ('train', 'eval'):
      ours, ref = rates[kind], rates[f'reference_{kind}']
      print(
        f'{kind}: ours {statistics.median(ours):.0f}, plain tf.data reference '
        f'{statistics.median(ref):.0f} images/s (medians); ours / reference per run: '
        + ', '.join(f'{r:.2f}' for r in result[f'{kind}_ratios'])
        + f'; median {result[f"{kind}_ratio"]:.2f}x'
      )
      ours, ref = result['cpu_ms'][kind], result['cpu_ms'][f'reference_{kind}']
      print(
        f'{kind}: CPU time per image, ours {statistics.median(ours):.2f} ms, reference '
        f'{statistics.median(ref):.2f} ms (medians; reference / ours '
        f'{statistics.median(ref) / statistics.median(ours):.2f}x)'
      )
  sys.stdout.flush()


if __name__ == '__main__':
  main(sys.argv[1:])
