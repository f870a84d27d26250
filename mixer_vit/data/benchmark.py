"""Throughput of the input pipeline alone (no model): training images per second.

    python -m mixer_vit.data.benchmark --dataset=digits
    python -m mixer_vit.data.benchmark --dataset=/path/to/image_folder --resolution=224

Reads the training split with the training preprocessing (default:
``decode|inception_crop(R)|flip_lr|value_range(-1,1)|onehot`` with R the data set's native size
or ``--resolution``), batches it as one process would, and times ``--batches`` batches after
``--warmup`` batches, ``--runs`` times. Prints each run and the median in images/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

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
) -> dict:
  """Measures the pipeline; returns the per-run and median images/s."""
  config = base.DataConfig(
    dataset=dataset,
    data_dir=data_dir,
    train_split=split,
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
  config = dataclasses.replace(
    config, pp_train=pp or f'decode|inception_crop({size})|flip_lr|value_range(-1,1)|onehot'
  )
  rates = []
  for _ in range(runs):
    ds = pipeline.local_train_dataset(config, 0, 1, batch_size)
    it = ds.as_numpy_iterator()
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    elapsed = time.perf_counter() - start
    assert batch['image'].shape[0] == batch_size
    rates.append(batches * batch_size / elapsed)
    del it, ds
  return {
    'dataset': dataset,
    'examples': info.num_examples[split],
    'native': native,
    'size': tuple(batch['image'].shape[1:3]),
    'pp': config.pp_train,
    'threads': threads or os.cpu_count(),
    'setup_s': setup_s,
    'rates': rates,
    'median': statistics.median(rates),
  }


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
  sys.stdout.flush()


if __name__ == '__main__':
  main(sys.argv[1:])
