"""The data benchmark: our pipeline against the plain tf.data reference, in one run."""

import numpy as np
from PIL import Image
import pytest

from mixer_vit.data import base
from mixer_vit.data import benchmark
from mixer_vit.data import pipeline


def _jpeg_folder(root, count=12):
  rng = np.random.RandomState(0)
  for i in range(count):
    d = root / 'train' / 'ab'[i % 2]
    d.mkdir(parents=True, exist_ok=True)
    h, w = (30, 40) if i % 3 else (36, 28)  # Mixed sizes: kept encoded, decoded every step.
    Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(d / f'{i}.jpg')


@pytest.mark.parametrize('dataset', ['digits', 'folder'])
def test_reference_option_times_both_and_gives_ratios(dataset, tmp_path, capsys):
  if dataset == 'folder':
    _jpeg_folder(tmp_path)
    dataset = str(tmp_path)
  args = [f'--dataset={dataset}', '--resolution=16', '--batch_size=8', '--batches=2']
  benchmark.main([*args, '--warmup=1', '--runs=2', '--reference', f'--data_dir={tmp_path}'])
  out = capsys.readouterr().out
  assert 'output 16x16' in out and 'decode_jpeg_and_inception_crop((16, 16))' in out
  assert 'evaluation pp: decode|resize_small(18)|central_crop((16, 16))' in out
  for kind in ('train', 'eval'):
    line = next(line for line in out.splitlines() if line.startswith(f'{kind}: ours'))
    ratios = line.split('per run: ')[1].split(';')[0].split(', ')
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios), line


def test_reference_does_the_same_evaluation_ops(tmp_path):
  """Same images as ours, up to our resize's rounding to whole pixel values."""
  _jpeg_folder(tmp_path)
  config = base.DataConfig(
    dataset=str(tmp_path), seed=0, batch_size=4, pp_test=benchmark.eval_pp((16, 16))
  )
  ours = next(pipeline.local_eval_dataset(config, 0, 1, 12, split='train').as_numpy_iterator())
  ref = benchmark.reference_dataset(config, 'train', (16, 16), 12, train=False)
  ref = next(ref.as_numpy_iterator())
  np.testing.assert_array_equal(ref['labels'], ours['labels'])
  np.testing.assert_allclose(ref['image'], ours['image'], atol=0.5 / 127.5 + 1e-6)
  train = benchmark.reference_dataset(config, 'train', (16, 16), 4, train=True)
  batch = next(train.as_numpy_iterator())
  assert batch['image'].shape == (4, 16, 16, 3) and batch['labels'].shape == (4, 2)
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1


def test_reference_refuses_a_custom_pp():
  with pytest.raises(ValueError, match='leave --pp out'):
    benchmark.run('digits', pp='decode|value_range(-1,1)|onehot', reference=True)
