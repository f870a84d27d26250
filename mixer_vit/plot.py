r"""Draws the training curves of runs from their ``metrics.jsonl``: loss, test accuracy, learning rate.

  python -m mixer_vit.plot --workdir=workdirs/digits --out=curves.png
  python -m mixer_vit.plot --workdir=workdirs/a --workdir=workdirs/b --label=A --label=B \
      --out=curves.png

Three panels against the training step, one line per workdir: the training loss (the mean over
each ``log_every`` interval, as logged), the test accuracy (solid; the accuracy of the EMA
parameters dashed, when the run has ``test_accuracy_ema``) and the learning rate. Reads only the
workdirs' ``metrics.jsonl`` (also while a run trains); writes one PNG. An existing ``--out`` is
replaced only with ``--overwrite`` and only when it is an earlier plot (a user's picture never).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import os
import sys
from typing import Any

from mixer_vit import cli
from mixer_vit import workdir as workdir_lib
from mixer_vit.runtime import paths
from mixer_vit.training import metrics

# (panel title, y label, [(metric, line style, legend suffix)]).
PANELS = (
  ('training loss', 'loss', [('loss', '-', '')]),
  (
    'test accuracy',
    'accuracy',
    [('test_accuracy', '-', ''), ('test_accuracy_ema', '--', ' (EMA)')],
  ),
  ('learning rate', 'lr', [('lr', '-', '')]),
)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The rows of ``workdir``'s ``metrics.jsonl``; FileNotFoundError names the path."""
  path = paths.join(workdir, workdir_lib.METRICS_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(
      f'{path} not found: --workdir must be a training workdir that has logged metrics '
      '(python -m mixer_vit.main --workdir=...).'
    )
  return metrics.read_jsonl(path)


def series(rows: Sequence[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows that hold ``name``, by step."""
  points = sorted((r['step'], r[name]) for r in rows if name in r and 'step' in r)
  return [s for s, _ in points], [float(v) for _, v in points]


def plot(
  workdirs: Sequence[str],
  out: str,
  labels: Sequence[str] | None = None,
  *,
  overwrite: bool = False,
) -> str:
  """Writes the curves of ``workdirs`` to the PNG ``out``; returns its path.

  An existing ``out`` is replaced only with ``overwrite`` and only when it is an earlier plot
  (``cli.check_output``); a ``cli.CommandError`` says why otherwise.
  """
  cli.check_output(out, '--out', overwrite=overwrite, ours=cli.png_is_ours, example='curves.png')
  if labels and len(labels) != len(workdirs):
    raise ValueError(f'{len(labels)} --label for {len(workdirs)} --workdir; give one per workdir.')
  runs = [read_metrics(w) for w in workdirs]  # All read before anything is drawn.
  labels = labels or [os.path.basename(os.path.normpath(w)) or w for w in workdirs]
  import matplotlib  # noqa: PLC0415  # pyplot only when drawing; the backend must be set first.

  matplotlib.use('Agg', force=False)
  from matplotlib import pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, (title, ylabel, lines) in zip(axes, PANELS):
    drawn = False
    for i, (rows, label) in enumerate(zip(runs, labels)):
      for name, style, suffix in lines:
        steps, values = series(rows, name)
        if steps:
          colour = colours[i % len(colours)]
          ax.plot(steps, values, style, color=colour, label=label + suffix, marker='.', ms=3)
          drawn = True
    if title == 'training loss' and drawn:
      ax.set_yscale('log')
    if not drawn:
      ax.text(0.5, 0.5, f'no {ylabel} rows', ha='center', va='center', transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn and (len(runs) > 1 or any(s for _, _, s in lines)):
      ax.legend(fontsize=8)
  fig.tight_layout()
  with paths.staged_path(out) as staged:
    fig.savefig(staged, format='png', dpi=100, metadata={'Software': cli.SOFTWARE})
  plt.close(fig)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(
    prog='python -m mixer_vit.plot',
    description=__doc__.split('\n\n')[0].strip(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    '--workdir', action='append', required=True, help='training workdir (repeat for several)'
  )
  parser.add_argument('--label', action='append', help='legend name per --workdir (default: name)')
  parser.add_argument('--out', default='curves.png', help='PNG file to write (default curves.png)')
  parser.add_argument(
    '--overwrite', action='store_true', help='replace an earlier plot at --out (only a plot)'
  )
  args = parser.parse_args(argv)
  try:
    path = plot(args.workdir, args.out, args.label, overwrite=args.overwrite)
  except (FileNotFoundError, ValueError) as e:
    return cli.fail(e)
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
