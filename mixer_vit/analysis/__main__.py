r"""The "How Do Vision Transformers Work?" analyses of a checkpoint: a picture and JSON numbers.

  python -m mixer_vit.analysis fourier --checkpoint=WORKDIR --out=fourier.png
  python -m mixer_vit.analysis noise --checkpoint=WORKDIR --out=noise.png [--noise_rms=0.1]
  python -m mixer_vit.analysis hessian --checkpoint=WORKDIR --out=hessian.png \
      [--batch_size=64 --batches=10 --iterations=100 --lanczos=20]
  python -m mixer_vit.analysis landscape --checkpoint=WORKDIR --out=landscape.png \
      [--dims=2 --steps=11 --span=1.0]
  python -m mixer_vit.analysis variance --checkpoint=ViT-B_16.npz --model=ViT-B_16 \
      --dataset=cifar10 --pp='decode|resize(224)|value_range(-1,1)|onehot' --out=variance.png
  python -m mixer_vit.analysis compare vit/fourier.json resnet/fourier.json --labels=ViT,ResNet \
      --out=fourier_compare.png

Each writes the picture to --out and the numbers beside it (PLOT.png -> PLOT.json); --json also
prints them. An existing output file is never replaced unless --overwrite is given. The examples
are the first --examples of --split (default: the train split for hessian and landscape, which
study the training loss; the test split for the others), preprocessed as the checkpoint expects
(a workdir's pp_test, without augmentation; for an .npz, --dataset and a resize to its
resolution, or --pp); the work is split over all devices. The model runs in float32. Every family
works: ViT, hybrids, Mixer, ResNet, AlterNet. See mixer_vit/analysis/<name>.py for what each
measures. `compare` overlays the JSON outputs of one analysis run on several models and prints
their key numbers as a Markdown table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import sys

from mixer_vit import cli
from mixer_vit.analysis import ANALYSES
from mixer_vit.analysis import common
from mixer_vit.analysis import compare
from mixer_vit.analysis import fourier
from mixer_vit.analysis import hessian
from mixer_vit.analysis import landscape
from mixer_vit.analysis import noise
from mixer_vit.analysis import variance

# Analyses of the training objective: on the train split unless --split says otherwise.
TRAINING_DATA = ('hessian', 'landscape')
MODULES = {
  'fourier': fourier,
  'noise': noise,
  'hessian': hessian,
  'landscape': landscape,
  'variance': variance,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = cli.ArgumentParser(
    prog='python -m mixer_vit.analysis',
    description=__doc__.split('\n\n')[0].strip(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__.split('\n\n', 1)[1],
  )
  parser.add_argument('analysis', choices=(*ANALYSES, 'compare'))
  parser.add_argument(
    'inputs', nargs='*', metavar='JSON', help='compare: the analysis outputs (PLOT.json) to compare'
  )
  cli.add_checkpoint_flags(parser, 'ema', required=False)
  parser.add_argument('--dataset', help="tfds name, 'digits' or an image-folder root")
  parser.add_argument('--data_dir', help='tfds data dir')
  parser.add_argument(
    '--split',
    help="split to analyse (default: the config's train_split for hessian and landscape, which "
    'study the training loss, else its test_split)',
  )
  parser.add_argument('--pp', help='preprocessing, ending in value_range(-1,1)|onehot')
  parser.add_argument(
    '--examples',
    type=cli.positive_int,
    default=512,
    help='examples analysed (default 512; hessian takes --batches x --batch_size)',
  )
  parser.add_argument(
    '--batch_size',
    type=cli.positive_int,
    default=64,
    help='global batch, split over the devices (default 64)',
  )
  parser.add_argument('--out', required=True, help='picture to write (PNG); numbers beside it')
  parser.add_argument('--json', action='store_true', help='also print the numbers as JSON')
  parser.add_argument('--overwrite', action='store_true', help='replace existing output files')
  parser.add_argument('--seed', type=int, default=0, help='noise draws / directions / vectors')
  parser.add_argument('--noise_rms', type=float, default=0.1, help='noise: RMS per image value')
  parser.add_argument('--batches', type=int, default=10, help='hessian: mini-batches')
  parser.add_argument('--iterations', type=int, default=100, help='hessian: power iterations')
  parser.add_argument('--tol', type=float, default=1e-4, help='hessian: relative convergence')
  parser.add_argument(
    '--lanczos',
    type=int,
    default=0,
    help='hessian: Lanczos steps (0: off); keeps that many parameter-sized vectors on the host',
  )
  parser.add_argument('--dims', type=int, default=2, choices=(1, 2), help='landscape: 1-D or 2-D')
  parser.add_argument('--steps', type=int, default=11, help='landscape: grid points per axis')
  parser.add_argument('--span', type=float, default=1.0, help='landscape: grid in [-span, span]')
  parser.add_argument(
    '--labels', help='compare: comma-separated names of the models (default: from the files)'
  )
  args = parser.parse_args(argv)
  if args.analysis == 'compare':
    if not args.inputs:
      parser.error(
        'compare needs the JSON files an analysis wrote, e.g. A/fourier.json B/fourier.json'
      )
    if args.checkpoint:
      parser.error('compare reads JSON files, not --checkpoint; drop --checkpoint')
  else:
    if args.inputs:
      parser.error(f'{args.analysis} takes no file arguments ({args.inputs[0]}); use --checkpoint')
    if not args.checkpoint:
      parser.error('the following arguments are required: --checkpoint')
  return args


def run(args: argparse.Namespace) -> dict:
  """Loads the checkpoint and runs the analysis; returns its numbers (written with the picture)."""
  common.refuse_existing_outputs(args.out, args.overwrite)
  if args.analysis == 'compare':
    labels = args.labels.split(',') if args.labels else None
    figure, result = compare.compare(args.inputs, labels)
    common.write_outputs(args.out, figure, result)
    return result
  subject = common.load_subject(
    args.checkpoint,
    args.model,
    dataset=args.dataset,
    data_dir=args.data_dir,
    split=args.split,
    pp=args.pp,
    examples=args.examples if args.analysis != 'hessian' else args.batches * args.batch_size,
    ema=args.ema,
    training_data=args.analysis in TRAINING_DATA,
  )
  module = MODULES[args.analysis]
  kwargs = {'batch_size': args.batch_size}
  if args.analysis == 'noise':
    kwargs.update(rms=args.noise_rms, seed=args.seed)
  elif args.analysis == 'hessian':
    kwargs.update(
      batches=args.batches,
      iterations=args.iterations,
      tol=args.tol,
      lanczos_steps=args.lanczos,
      seed=args.seed,
    )
  elif args.analysis == 'landscape':
    kwargs.update(dims=args.dims, steps=args.steps, span=args.span, seed=args.seed)
  result = module.analyse(subject, **kwargs)
  common.write_outputs(args.out, module.plot(result), result)
  return result


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    result = run(args)
  except (ValueError, FileNotFoundError, FileExistsError, KeyError, cli.CommandError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result))
  elif args.analysis == 'compare':
    print(result['table'])
    print(f'wrote {args.out} and {common.json_path(args.out)}')
  else:
    print(f'wrote {args.out} and {common.json_path(args.out)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
