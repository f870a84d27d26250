r"""Evaluates a checkpoint on a data set split: top-1, top-5 accuracy and the example count; or,
with ``--fewshot``, the few-shot linear probes of its representation (``mixer_vit.training.fewshot``).

  python -m mixer_vit.evaluate --checkpoint=WORKDIR [--split=test] [--ema]
  python -m mixer_vit.evaluate --checkpoint=ViT-B_16.npz --model=ViT-B_16 \
      --dataset=cifar10 --pp='decode|resize(384)|value_range(-1,1)|onehot' [--split=test]
  python -m mixer_vit.evaluate --checkpoint=WORKDIR --fewshot [--fewshot_dataset=digits] \
      [--shots=1,5,10] [--fewshot_layer=pre_logits] [--fewshot_select=loo|test]
  python -m mixer_vit.evaluate --checkpoint=DVT_WORKDIR --sweep [--json] \
      [--baseline=WORKDIR ...] [--out=SWEEP.png [--overwrite]]
  python -m mixer_vit.evaluate --checkpoint=DVT_WORKDIR --budget=GFLOPS \
      [--holdout_split='train[-5000:]']

``--sweep`` and ``--budget`` are for Dynamic ViT cascades (family ``dvt``, ``models.dvt``):
``--sweep`` prints, for one threshold shared by every stage (and for each stage alone), the
top-1 accuracy, the mean FLOPs per image (analytic, reuse included) and the share of images
leaving at each stage; ``--budget`` chooses per-stage thresholds that meet a mean budget (GFLOPs
per image) on ``--holdout_split`` of the training data (default its last 5,000 examples,
``train[-5000:]``; held out only if the run trained without them) and reports the test accuracy
(``models.dvt_adaptive``). ``--baseline`` evaluates other checkpoints (single models: ViT,
hybrid, Mixer or ResNet) on the same split beside the sweep, with their FLOPs per image
(``models.flops``); ``--out`` draws the sweep, each stage alone and the baselines as accuracy
against FLOPs per image into a PNG, under the output rules of ``mixer_vit.cli`` (an existing file
is replaced only with ``--overwrite`` and only when it is an earlier picture of ours).

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
import os
import sys
from typing import Any

import jax
import numpy as np

from mixer_vit import cli
from mixer_vit import data
from mixer_vit import infer
from mixer_vit import workdir as workdir_lib
from mixer_vit.models import dvt
from mixer_vit.models import dvt_adaptive
from mixer_vit.models import flops as flops_lib
from mixer_vit.runtime import parallel
from mixer_vit.runtime import paths
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


# The thresholds --sweep shares between the stages.
SWEEP_THRESHOLDS = (
  0.0,
  0.5,
  0.6,
  0.7,
  0.8,
  0.85,
  0.875,
  0.9,
  0.925,
  0.95,
  0.98,
  0.99,
  0.995,
  0.999,
  1.0,
)


def stage_probabilities(
  classifier: Any, config: Any, split: str, mesh: Any = None
) -> tuple[np.ndarray, np.ndarray]:
  """(every stage's probabilities (K, N, classes), labels (N,)) of a cascade on ``split``."""
  config = config.copy_and_resolve_references()
  mesh = mesh or parallel.make_mesh()
  with config.unlocked():
    config.test_split = split
    if config.eval_batch_size % mesh.size:
      config.eval_batch_size = max(mesh.size, config.eval_batch_size // mesh.size * mesh.size)
  repl = parallel.replicated(mesh)
  step = jax.jit(
    lambda p, x: jax.nn.softmax(
      classifier.model.apply({'params': p}, x, train=False, all_stages=True), axis=-1
    ),
    in_shardings=(repl, parallel.batch_sharding(mesh)),
    out_shardings=repl,
  )
  params = parallel.replicate(classifier.params, mesh)
  labels, probs = [], []
  for batch in data.make_eval_iterator(config, mesh):
    mask, y, p = parallel.to_host((batch['mask'], batch['labels'], step(params, batch['image'])))
    labels.append(np.argmax(y, axis=-1)[mask])
    probs.append(p[:, mask])
  return np.concatenate(probs, axis=1), np.concatenate(labels)


def cascade_report(
  classifier: Any, config: Any, budget: float | None = None, holdout_split: str = 'train[-5000:]'
) -> dict[str, Any]:
  """A cascade's operating points on the test split (``--sweep``), or with ``budget`` (FLOPs per
  image) the thresholds chosen on ``holdout_split`` and their test result (``--budget``)."""
  flops = dvt.exit_flops(classifier.model_config)
  k = len(flops)
  report = {'dataset': str(config.dataset), 'split': str(config.test_split)}
  report['exit_gflops'] = [float(f) / 1e9 for f in flops]
  if budget is not None:
    held, held_labels = stage_probabilities(classifier, config, holdout_split)
    chosen = dvt_adaptive.budget_thresholds(held, held_labels, flops, budget)
    report['holdout'] = {'split': holdout_split, 'examples': len(held_labels), **chosen}
  probs, labels = stage_probabilities(classifier, config, str(config.test_split))
  if budget is not None:
    report['budget'] = dvt_adaptive.operating_point(
      probs, labels, report['holdout']['thresholds'], flops
    )
    return report
  report['sweep'] = [
    dvt_adaptive.operating_point(probs, labels, [t] * (k - 1), flops) for t in SWEEP_THRESHOLDS
  ]
  report['stages'] = [  # Every image through stage j, none leaving before.
    dvt_adaptive.operating_point(probs, labels, [1.0] * j + [0.0] * (k - 1 - j), flops)
    for j in range(k)
  ]
  return report


def _point_line(point: dict[str, Any]) -> str:
  shares = ' / '.join(f'{100 * s:.1f}' for s in point['exit_shares'])
  return (
    f'top-1 {100 * point["accuracy"]:.2f} %, {point["mean_flops"] / 1e9:.5f} GFLOPs per image, '
    f'leaving at each stage {shares} %'
  )


def format_cascade_report(report: dict[str, Any]) -> str:
  gflops = ', '.join(f'{g:.5f}' for g in report['exit_gflops'])
  lines = [
    f'{report["dataset"]} {report["split"]}: {len(report["exit_gflops"])} stages; GFLOPs per '
    f'image leaving after each stage: {gflops}'
  ]
  if 'budget' in report:
    held = report['holdout']
    thresholds = ', '.join(f'{t:.4f}' for t in held['thresholds'])
    lines.append(
      f'thresholds {thresholds} chosen on {held["split"]} ({held["examples"]} examples: '
      f'{_point_line(held)})'
    )
    lines.append(f'test: {_point_line(report["budget"])}')
    return '\n'.join(lines)
  for t, point in zip(SWEEP_THRESHOLDS, report['sweep']):
    lines.append(f'threshold {t:<6g} {_point_line(point)}')
  for j, point in enumerate(report['stages']):
    lines.append(f'stage {j} answering every image: {_point_line(point)}')
  for point in report.get('baselines', []):
    lines.append(
      f'{point["label"]} ({point["model"]}) alone: top-1 {100 * point["accuracy"]:.2f} %, '
      f'{point["mean_flops"] / 1e9:.5f} GFLOPs per image'
    )
  return '\n'.join(lines)


def baseline_point(baseline: Any, config: Any) -> dict[str, Any]:
  """A single model beside a cascade's sweep: its top-1 on the cascade's data set and split (with
  its own preprocessing when it is a workdir) and its FLOPs per image."""
  per_image = flops_lib.forward_flops(baseline.model_config, baseline.image_size)
  if per_image is None:
    raise ValueError(
      f'--baseline={baseline.source}: a {baseline.model_config.family} model; the analytic FLOP '
      'count covers ViTs, hybrids, Mixers and ResNets'
    )
  own = data_config(baseline, str(config.dataset), config.get('data_dir'))
  result = evaluate_classifier(baseline, own, str(config.test_split))
  return {
    'checkpoint': str(baseline.source),
    'label': os.path.basename(os.path.normpath(str(baseline.source))),
    'model': str(baseline.model_config.name),
    'accuracy': result['top1'],
    'mean_flops': per_image,
    'examples': result['examples'],
  }


def plot_cascade_sweep(report: dict[str, Any], out: str, title: str = '') -> str:
  """Draws a ``--sweep`` report into the PNG ``out``: top-1 against mean GFLOPs per image for the
  shared thresholds (a line, each point marked with its threshold), each stage alone and the
  baselines. ``out`` must have passed ``cli.check_output``."""
  import matplotlib  # noqa: PLC0415  # pyplot only when drawing; the backend must be set first.

  matplotlib.use('Agg', force=False)
  from matplotlib import pyplot as plt  # noqa: PLC0415
  from matplotlib import ticker  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(9.0, 4.4))
  sweep = report['sweep']
  x = [p['mean_flops'] / 1e9 for p in sweep]
  y = [100 * p['accuracy'] for p in sweep]
  ax.plot(x, y, '-o', color='C0', ms=4, label='cascade, one threshold for every stage', zorder=3)
  groups: dict[tuple[float, float], list[float]] = {}  # Thresholds giving the same point.
  for t, xi, yi in zip(SWEEP_THRESHOLDS, x, y):
    groups.setdefault((xi, yi), []).append(t)
  for i, ((xi, yi), ts) in enumerate(groups.items()):  # Labels below and above in turn.
    text = f'{ts[0]:g}' if len(ts) == 1 else f'{ts[0]:g}-{ts[-1]:g}'
    offset = (3, -11) if i % 2 == 0 else (-4, 5)
    ax.annotate(text, (xi, yi), textcoords='offset points', xytext=offset, fontsize=7)
  for j, p in enumerate(report['stages']):
    xy = (p['mean_flops'] / 1e9, 100 * p['accuracy'])
    label = 'each stage answering every image' if j == 0 else None
    ax.plot(*xy, 's', color='C1', ms=7, zorder=4, label=label)
    ax.annotate(f'stage {j}', xy, textcoords='offset points', xytext=(8, -3), fontsize=8)
  for i, p in enumerate(report.get('baselines', [])):
    xy = (p['mean_flops'] / 1e9, 100 * p['accuracy'])
    ax.plot(*xy, '*', color=f'C{2 + i}', ms=12, zorder=5, label=f'single model: {p["label"]}')
    ax.annotate(p['label'], xy, textcoords='offset points', xytext=(7, -3), fontsize=8)
  ax.set_xscale('log')
  ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel('mean GFLOPs per image (log scale)')
  ax.set_ylabel('top-1 (%)')
  ax.set_title(title or f'{report["dataset"]} {report["split"]}', fontsize=10)
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
  fig.tight_layout()
  with paths.staged_path(out) as staged:
    fig.savefig(staged, format='png', dpi=120, metadata={'Software': cli.SOFTWARE})
  plt.close(fig)
  return out


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


def _load_baseline(path: str) -> Any:
  try:
    return infer.load_classifier(path)
  except (ValueError, FileNotFoundError, KeyError) as e:
    text = cli.one_line(e)
    raise cli.CommandError(text if path in text else f'--baseline={path}: {text}') from None


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
  parser.add_argument(
    '--sweep', action='store_true', help='cascades (dvt): accuracy and FLOPs per exit threshold'
  )
  parser.add_argument(
    '--budget', type=float, help='cascades (dvt): mean GFLOPs per image to choose thresholds for'
  )
  parser.add_argument(
    '--holdout_split',
    default='train[-5000:]',
    help="training examples --budget chooses thresholds on (default 'train[-5000:]')",
  )
  parser.add_argument(
    '--baseline',
    action='append',
    default=[],
    help="with --sweep: a single model's workdir to evaluate beside the cascade (repeatable)",
  )
  parser.add_argument('--out', help='with --sweep: PNG to draw accuracy against FLOPs into')
  parser.add_argument(
    '--overwrite', action='store_true', help='replace an earlier picture at --out (only ours)'
  )
  args = parser.parse_args(argv)
  cascade = args.sweep or args.budget is not None
  if args.sweep and args.budget is not None:
    parser.error('--sweep and --budget: give one')
  if cascade and args.fewshot:
    parser.error('--sweep / --budget: not with --fewshot')
  sweep_only = [f'--{name}' for name in ('baseline', 'out', 'overwrite') if getattr(args, name)]
  if sweep_only and not args.sweep:
    parser.error(f'{", ".join(sweep_only)}: only with --sweep')
  if args.budget is not None and args.budget <= 0:
    parser.error(f'--budget={args.budget}: give a positive number of GFLOPs per image')
  fewshot_only = ('fewshot_dataset', 'fewshot_splits', 'shots', 'fewshot_layer', 'fewshot_select')
  given = [f'--{name}' for name in fewshot_only if getattr(args, name)]
  if given and not args.fewshot:
    parser.error(f'{", ".join(given)}: only with --fewshot')
  try:
    if args.out:  # Refused before anything is computed.
      cli.check_output(
        args.out, '--out', overwrite=args.overwrite, ours=cli.png_is_ours, example='sweep.png'
      )
    classifier = infer.load_from_args(args)
    dataset = args.dataset
    if args.fewshot and not dataset and args.fewshot_dataset:
      dataset = args.fewshot_dataset.split(',')[0].strip()
    config = data_config(classifier, dataset, args.data_dir, args.pp, args.batch_size)
    if cascade and classifier.model_config.family != 'dvt':
      raise ValueError(
        f'{"--sweep" if args.sweep else "--budget"}: {args.checkpoint} is a '
        f'{classifier.model_config.family} model; early exits need a Dynamic ViT cascade '
        '(family dvt)'
      )
    if cascade:
      budget = None if args.budget is None else args.budget * 1e9
      report = cascade_report(classifier, config, budget, args.holdout_split)
      if args.baseline:
        report['baselines'] = [
          baseline_point(_load_baseline(path), config) for path in args.baseline
        ]
      if args.out:
        plot_cascade_sweep(report, args.out, f'{classifier.model_config.name} on {config.dataset}')
      print(json.dumps(report) if args.json else format_cascade_report(report))
      if args.out and not args.json:
        print(f'wrote {args.out}')
      return 0
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
