r"""Evaluates a checkpoint on a data set split: top-1, top-5 accuracy and the example count; or,
with ``--fewshot``, the few-shot linear probes of its representation (``mixer_vit.training.fewshot``).

  python -m mixer_vit.evaluate --checkpoint=WORKDIR [--split=test] [--ema]
  python -m mixer_vit.evaluate --checkpoint=ViT-B_16.npz --model=ViT-B_16 \
      --dataset=cifar10 --pp='decode|resize(384)|value_range(-1,1)|onehot' [--split=test]
  python -m mixer_vit.evaluate --checkpoint=WORKDIR --fewshot [--fewshot_dataset=digits] \
      [--shots=1,5,10] [--fewshot_layer=pre_logits] [--fewshot_select=loo|test]

It is the trainer's own evaluation: ``data.make_eval_iterator`` (every example of the split once,
padding rows masked out) and ``steps.make_eval_step`` / ``steps.evaluate``, data parallel over all
devices. A workdir brings its data config (``config.json``); ``--dataset``, ``--data_dir``,
``--pp`` and ``--batch_size`` override it. For an ``.npz`` file ``--dataset`` is required and the
preprocessing defaults to a resize to the checkpoint's resolution.

``--ema`` evaluates the EMA parameters of a run trained with ``config.ema_decay`` (as
``mixer_vit.infer --ema``: the workdir checkpoint's, or the ``params_ema.npz`` beside its
``params.npz``).

``--fewshot`` probes the data sets of the workdir's ``config.fewshot`` (default: its training data
set), or ``--fewshot_dataset`` (comma-separated names or image folders, with the splits of
``--fewshot_splits=TRAIN,TEST``), preprocessed with ``--pp`` or the config's ``pp_test``.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import sys
from typing import Any

import jax
import numpy as np

from mixer_vit import cli
from mixer_vit import data
from mixer_vit import infer
from mixer_vit import workdir as workdir_lib
from mixer_vit.runtime import parallel
from mixer_vit.training import config_utils
from mixer_vit.training import fewshot
from mixer_vit.training import steps


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


def fewshot_classifier(
  classifier: Any,
  config: Any,
  datasets: str | None = None,
  splits: str | None = None,
  shots: str | None = None,
  layer: str | None = None,
  select: str | None = None,
  mesh: Any = None,
) -> list[dict[str, Any]]:
  """Few-shot probe results of ``classifier`` (``fewshot.Evaluator.run_detailed`` rows); the
  arguments override ``config.fewshot``."""
  config = config.copy_and_resolve_references()
  if 'fewshot' not in config:  # Workdirs written before the few-shot keys existed.
    with config.unlocked():
      config.fewshot = config_utils.base_config().fewshot
  with config.unlocked():
    if datasets:
      train_split, test_split = 'train', 'test'
      if splits:
        parts = [s.strip() for s in splits.split(',')]
        if len(parts) != 2 or not all(parts):
          raise ValueError(f'--fewshot_splits must be TRAIN,TEST (e.g. train,test), got {splits!r}')
        train_split, test_split = parts
      config.fewshot.datasets = {
        fewshot.metric_name(d): {'dataset': d, 'train_split': train_split, 'test_split': test_split}
        for d in (s.strip() for s in datasets.split(','))
        if d
      }
    elif splits:
      raise ValueError('--fewshot_splits needs --fewshot_dataset')
    if shots:
      config.fewshot.shots = fewshot.parse_shots(shots, '--shots')
    if layer:
      config.fewshot.layer = fewshot.check_layer(layer, '--fewshot_layer')
    if select:
      config.fewshot.select = select
  evaluator = fewshot.Evaluator(config, classifier.model, mesh or parallel.make_mesh())
  return evaluator.run_detailed(classifier.params)


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(
    prog='python -m mixer_vit.evaluate',
    description='Top-1/top-5 accuracy of a checkpoint on a data set split (exact, masked).',
  )
  cli.add_checkpoint_flags(parser, 'resolution', 'dtype', 'ema')
  parser.add_argument('--split', help="split to evaluate (default: the config's test_split)")
  parser.add_argument('--dataset', help="tfds name, 'digits' or an image-folder root")
  parser.add_argument('--data_dir', help='tfds data dir')
  parser.add_argument('--pp', help='evaluation preprocessing, ending in value_range(-1,1)|onehot')
  parser.add_argument('--batch_size', type=cli.positive_int, help='global evaluation batch size')
  parser.add_argument('--json', action='store_true', help='print the result as JSON')
  parser.add_argument(
    '--fewshot', action='store_true', help='few-shot linear probes of the representation instead'
  )
  parser.add_argument(
    '--fewshot_dataset', help="data sets to probe, comma-separated (default: config.fewshot's)"
  )
  parser.add_argument('--fewshot_splits', help='TRAIN,TEST splits of --fewshot_dataset')
  parser.add_argument('--shots', help='examples per class, e.g. 1,5,10,25')
  parser.add_argument('--fewshot_layer', help="feature layer (default 'pre_logits')")
  parser.add_argument(
    '--fewshot_select', choices=fewshot.SELECT, help='how to pick the L2 strength'
  )
  args = parser.parse_args(argv)
  fewshot_only = ('fewshot_dataset', 'fewshot_splits', 'shots', 'fewshot_layer', 'fewshot_select')
  given = [f'--{name}' for name in fewshot_only if getattr(args, name)]
  if given and not args.fewshot:
    parser.error(f'{", ".join(given)}: only with --fewshot')
  try:
    classifier = infer.load_from_args(args)
    dataset = args.dataset
    if args.fewshot and not dataset and args.fewshot_dataset:
      dataset = args.fewshot_dataset.split(',')[0].strip()
    config = data_config(classifier, dataset, args.data_dir, args.pp, args.batch_size)
    if args.fewshot:
      rows = fewshot_classifier(
        classifier,
        config,
        args.fewshot_dataset,
        args.fewshot_splits,
        args.shots,
        args.fewshot_layer,
        args.fewshot_select,
      )
    else:
      result = evaluate_classifier(classifier, config, args.split)
  except (ValueError, FileNotFoundError, KeyError) as e:
    return cli.fail(e)
  if args.fewshot:
    if args.json:
      print(json.dumps(rows))
    for row in [] if args.json else rows:
      print(
        f'{row["name"]}: {100 * row["accuracy"]:.2f} % ({row["train_examples"]} train, '
        f'{row["test_examples"]} test examples; l2 {row["l2"]:g} by {row["select"]}, '
        f'layer {row["layer"]})'
      )
    return 0
  if args.json:
    print(json.dumps(result))
  else:
    top5 = 'n/a' if result['top5'] is None else f'{100 * result["top5"]:.2f} %'
    print(
      f'{result["dataset"]} {result["split"]}{" (EMA)" if args.ema else ""}: top-1 '
      f'{100 * result["top1"]:.2f} %, top-5 {top5}, loss {result["loss"]:.4f}, '
      f'{result["examples"]} examples'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
