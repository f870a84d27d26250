r"""Evaluates a checkpoint on a data set split: top-1, top-5 accuracy and the example count.

  python -m mixer_vit.evaluate --checkpoint=WORKDIR [--split=test]
  python -m mixer_vit.evaluate --checkpoint=ViT-B_16.npz --model=ViT-B_16 \
      --dataset=cifar10 --pp='decode|resize(384)|value_range(-1,1)|onehot' [--split=test]

It is the trainer's own evaluation: ``data.make_eval_iterator`` (every example of the split once,
padding rows masked out) and ``steps.make_eval_step`` / ``steps.evaluate``, data parallel over all
devices. A workdir brings its data config (``config.json``); ``--dataset``, ``--data_dir``,
``--pp`` and ``--batch_size`` override it. For an ``.npz`` file ``--dataset`` is required and the
preprocessing defaults to a resize to the checkpoint's resolution.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import sys
from typing import Any

import jax
import numpy as np

from mixer_vit import config_utils
from mixer_vit import data
from mixer_vit import infer
from mixer_vit import parallel
from mixer_vit import sizes
from mixer_vit import steps
from mixer_vit import workdir as workdir_lib


def evaluate_classifier(
  classifier: Any, config: Any, split: str | None = None, mesh: Any = None
) -> dict[str, Any]:
  """Exact metrics of an ``infer.Classifier`` over ``split`` of the data set of ``config``.

  Returns ``{'top1', 'top5', 'loss', 'examples', 'split', 'dataset'}`` (top5 is None for data sets
  of at most 5 classes, where it is trivially 1).
  """
  config = config.copy_and_resolve_references()
  if split:
    with config.unlocked():
      config.test_split = split
  info = data.get_info(config)
  if info.num_classes != classifier.num_classes:
    raise ValueError(
      f'the data set {config.dataset!r} has {info.num_classes} classes but the '
      f'checkpoint {classifier.source} has {classifier.num_classes}; evaluate on '
      'the data set it was trained or fine-tuned on'
    )
  mesh = mesh or parallel.make_mesh()
  if config.eval_batch_size % mesh.size:
    with config.unlocked():
      config.eval_batch_size = max(mesh.size, config.eval_batch_size // mesh.size * mesh.size)
  eval_step = steps.make_eval_step(classifier.model, config, mesh)
  params = parallel.replicate(classifier.params, mesh)
  batches = data.make_eval_iterator(config, mesh)
  result = steps.evaluate(
    eval_step,
    params,
    batches,
    info.num_classes,
    f'the split {config.test_split!r} of {config.dataset!r}',
  )
  return {
    'dataset': str(config.dataset),
    'split': str(config.test_split),
    'top1': result['test_accuracy'],
    'top5': result.get('test_top5_accuracy'),
    'loss': result['test_loss'],
    'examples': result['test_examples'],
  }


def predict_split(
  classifier: Any, config: Any, split: str | None = None, mesh: Any = None
) -> tuple[np.ndarray, np.ndarray]:
  """(labels, predicted classes) for every example of ``split``, in the order the evaluation
  iterator yields them (padding rows dropped by their mask); e.g. for a confusion matrix.

  Single-process only (each process sees the whole global batch only on one host).
  """
  if jax.process_count() > 1:
    raise NotImplementedError(
      'predict_split gathers predictions on one host; run it with one '
      'process (evaluate_classifier works on many)'
    )
  config = config.copy_and_resolve_references()
  mesh = mesh or parallel.make_mesh()
  with config.unlocked():
    if split:
      config.test_split = split
    if config.eval_batch_size % mesh.size:
      config.eval_batch_size = max(mesh.size, config.eval_batch_size // mesh.size * mesh.size)
  repl = parallel.replicated(mesh)
  params = parallel.replicate(classifier.params, mesh)
  step = jax.jit(
    lambda p, x: jax.numpy.argmax(classifier.model.apply({'params': p}, x, train=False), axis=-1),
    in_shardings=(repl, parallel.batch_sharding(mesh)),
    out_shardings=repl,
  )
  labels, preds = [], []
  for batch in data.make_eval_iterator(config, mesh):
    mask, y, pred = parallel.to_host((batch['mask'], batch['labels'], step(params, batch['image'])))
    labels.append(np.argmax(y, axis=-1)[mask])
    preds.append(pred[mask])
  return np.concatenate(labels), np.concatenate(preds)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[i, j]: examples of class i predicted as class j."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def data_config(
  classifier: Any,
  dataset: str | None = None,
  data_dir: str | None = None,
  pp: str | None = None,
  batch_size: int | None = None,
) -> Any:
  """The data config to evaluate ``classifier`` with: its workdir's, or defaults for an .npz."""
  if workdir_lib.is_workdir(classifier.source):
    config = workdir_lib.read_config(classifier.source)
  else:
    if not dataset:
      raise ValueError(
        '--dataset is required for an .npz checkpoint (a tfds name such as '
        "cifar10, 'digits', or an image folder ROOT with ROOT/test/<class>/*)"
      )
    config = config_utils.base_config()
    h, w = classifier.image_size
    config.pp_test = f'decode|resize(({h}, {w}))|value_range(-1, 1)|onehot'
  with config.unlocked():
    if dataset:
      config.dataset = dataset
    if data_dir:
      config.data_dir = data_dir
    if pp:
      config.pp_test = pp
    if batch_size:
      config.eval_batch_size = batch_size
  return config


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m mixer_vit.evaluate',
    description='Top-1/top-5 accuracy of a checkpoint on a data set split (exact, masked).',
  )
  parser.add_argument('--checkpoint', required=True, help='training workdir or .npz file')
  parser.add_argument('--model', help='model name (required for .npz), e.g. ViT-B_16')
  parser.add_argument('--split', help="split to evaluate (default: the config's test_split)")
  parser.add_argument('--dataset', help="tfds name, 'digits' or an image-folder root")
  parser.add_argument('--data_dir', help='tfds data dir')
  parser.add_argument('--pp', help='evaluation preprocessing, ending in value_range(-1,1)|onehot')
  parser.add_argument('--batch_size', type=int, help='global evaluation batch size')
  parser.add_argument('--resolution', help='R or H,W (.npz checkpoints of non-square grids)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None)
  parser.add_argument('--json', action='store_true', help='print the result as JSON')
  args = parser.parse_args(argv)
  try:
    classifier = infer.load_classifier(
      args.checkpoint, args.model, resolution=sizes.parse(args.resolution), dtype=args.dtype
    )
    config = data_config(classifier, args.dataset, args.data_dir, args.pp, args.batch_size)
    result = evaluate_classifier(classifier, config, args.split)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result))
  else:
    top5 = 'n/a' if result['top5'] is None else f'{100 * result["top5"]:.2f} %'
    print(
      f'{result["dataset"]} {result["split"]}: top-1 {100 * result["top1"]:.2f} %, '
      f'top-5 {top5}, loss {result["loss"]:.4f}, {result["examples"]} examples'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
