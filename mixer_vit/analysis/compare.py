"""Several models side by side: the JSON numbers of one analysis, run on each, in one picture and
one table.

`load` reads analysis outputs (PLOT.json files the command wrote) and checks they are of one
analysis; `summary` reduces one result to the few numbers the paper's claims are about; `plot`
overlays the results (fourier and variance against depth, noise per band, the Hessian's top
eigenvalues per mini-batch, the landscape's slice along its first direction); `table` writes the
summaries as a Markdown table.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from mixer_vit import cli
from mixer_vit.analysis import ANALYSES
from mixer_vit.analysis import common

# Noise bands summarised as "low" and "high" frequency (indices of the 0.1 pi bands).
LOW_BANDS = (0, 1, 2)
HIGH_BANDS = (7, 8, 9)
# Block kinds in the order their columns appear.
KINDS = ('attention', 'token_mixing', 'mlp', 'conv')


def load(paths: list[str]) -> list[dict[str, Any]]:
  """The analysis results in `paths`: JSON files an analysis wrote, all of one analysis."""
  if len(paths) < 1:
    raise ValueError('compare needs analysis JSON files: python -m mixer_vit.analysis compare '
                     'A/fourier.json B/fourier.json --out=compare.png')  # fmt: skip
  results = []
  for path in paths:
    try:
      with open(path, encoding='utf-8') as f:
        result = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f'{path}: no such file (give the .json an analysis wrote)') from None
    except (OSError, ValueError) as e:
      raise ValueError(
        f'{path}: not readable as JSON ({e}); give the .json an analysis wrote'
      ) from e
    if not isinstance(result, dict) or not cli.is_ours(result.get('software')):
      raise ValueError(
        f'{path}: not the numbers of python -m mixer_vit.analysis (no software mark)'
      )
    if result.get('analysis') not in ANALYSES:
      raise ValueError(f'{path}: analysis {result.get("analysis")!r} cannot be compared')
    results.append(result)
  kinds = sorted({r['analysis'] for r in results})
  if len(kinds) > 1:
    raise ValueError(f'the files hold different analyses ({", ".join(kinds)}); compare one kind')
  return results


def default_label(result: dict[str, Any], path: str) -> str:
  """The model name, or the checkpoint folder's name for the small custom models."""
  name = str(result.get('model', ''))
  if name.startswith('testing') or not name:
    return os.path.basename(str(result.get('checkpoint', path)).rstrip('/'))
  return name


def _by_kind(values: dict[str, float], prefix: str) -> dict[str, float]:
  return {f'{prefix} {kind}': values[kind] for kind in KINDS if kind in values}


def summary(result: dict[str, Any]) -> dict[str, float | None]:
  """The few numbers of `result` that the paper's claims are about."""
  kind = result['analysis']
  if kind == 'fourier':
    return _by_kind(result['mean_change_by_kind'], 'Δ high-freq')
  if kind == 'variance':
    return _by_kind(result['mean_ratio_by_kind'], 'variance ratio')
  if kind == 'noise':
    drops = {b['band']: b['drop'] for b in result['bands'] if b['drop'] is not None}
    low = [drops[b] for b in LOW_BANDS if b in drops]
    high = [drops[b] for b in HIGH_BANDS if b in drops]
    return {
      'clean accuracy': result['clean_accuracy'],
      'drop 0-0.3π': float(np.mean(low)) if low else None,
      'drop 0.7-1π': float(np.mean(high)) if high else None,
    }
  if kind == 'hessian':
    numbers = {'top median': result['top_median'], 'top max': result['top_max']}
    if 'lanczos_min_median' in result:
      numbers['lowest Lanczos median'] = result['lanczos_min_median']
      numbers['negative batches'] = result['negative_lanczos_min'] / len(result['batches'])
    return numbers
  loss = np.asarray(result['loss'], np.float64)
  origin = result['loss_at_origin']
  return {
    'loss at origin': origin,
    'mean rise over grid': float(np.mean(loss) - origin) if origin is not None else None,
  }


def table(results: list[dict[str, Any]], labels: list[str]) -> str:
  """The summaries as a Markdown table, one row per model."""
  summaries = [summary(r) for r in results]
  columns = list(dict.fromkeys(key for s in summaries for key in s))
  lines = [
    '| model | ' + ' | '.join(columns) + ' |',
    '|---|' + '---:|' * len(columns),
  ]
  for label, numbers in zip(labels, summaries):
    cells = [_cell(numbers.get(c)) for c in columns]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _cell(value: float | None) -> str:
  return '–' if value is None else f'{value:.3g}'


def plot(results: list[dict[str, Any]], labels: list[str]):
  """One picture overlaying the results (all of one analysis)."""
  kind = results[0]['analysis']
  fig, (ax,) = common.figure(1, width=8.0, height=4.5)
  for result, label in zip(results, labels):
    if kind in ('fourier', 'variance'):
      key = 'high_frequency' if kind == 'fourier' else 'variance'
      rows = [r for r in result['blocks'] if r.get(key) is not None]
      (line,) = ax.plot([r['depth'] for r in rows], [r[key] for r in rows], label=label)
      for block_kind, (_, marker) in common.KIND_STYLE.items():
        these = [r for r in rows if r['kind'] == block_kind]
        ax.scatter([r['depth'] for r in these], [r[key] for r in these], color=line.get_color(),
                   marker=marker, s=18)  # fmt: skip
    elif kind == 'noise':
      bands = [b for b in result['bands'] if b['drop'] is not None]
      ax.plot([b['low'] + 0.05 for b in bands], [100 * b['drop'] for b in bands], marker='o',
              label=label)  # fmt: skip
    elif kind == 'hessian':
      tops = sorted(b['top'] for b in result['batches'])
      ax.plot(tops, np.arange(1, len(tops) + 1) / len(tops), marker='o', drawstyle='steps-post',
              label=label)  # fmt: skip
    else:
      coords = np.asarray(result['coordinates'])
      loss = np.asarray(result['loss'])
      if result['dims'] == 2:
        loss = loss[:, len(coords) // 2]  # Along direction 1, direction 2 at 0.
      ax.plot(coords, loss, marker='o', markersize=3, label=label)
  axis_labels = {
    'fourier': ('normalised depth', 'Δ log amplitude at π (vs frequency 0)'),
    'variance': ('normalised depth', 'feature-map variance'),
    'noise': ('noise frequency band centre (× π)', 'accuracy drop (points)'),
    'hessian': ('top Hessian eigenvalue per mini-batch', 'share of mini-batches (cumulative)'),
    'landscape': ('step along the first filter-normalised direction', 'training loss'),
  }
  ax.set_xlabel(axis_labels[kind][0])
  ax.set_ylabel(axis_labels[kind][1])
  if kind == 'variance':
    ax.set_yscale('log')
  if kind == 'hessian':
    ax.set_xscale('symlog')
  ax.set_title(f'{kind}: ' + ', '.join(labels), fontsize=9)
  models = ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  if kind in ('fourier', 'variance'):  # A second legend: the markers of the block kinds.
    present = {r['kind'] for result in results for r in result['blocks']}
    markers = [
      ax.scatter([], [], color='0.4', marker=marker, s=18, label=block_kind)
      for block_kind, (_, marker) in common.KIND_STYLE.items()
      if block_kind in present
    ]
    ax.legend(handles=markers, fontsize=8, loc='lower left', bbox_to_anchor=(1.01, 0.0))
    ax.add_artist(models)
  fig.tight_layout()
  return fig


def compare(paths: list[str], labels: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
  """(picture, JSON-ready numbers) comparing the analysis outputs in `paths`."""
  results = load(paths)
  if labels is None:
    labels = [default_label(r, p) for r, p in zip(results, paths)]
  elif len(labels) != len(paths):
    raise ValueError(f'--labels names {len(labels)} models for {len(paths)} files; give one each')
  numbers = {
    'analysis': 'compare',
    'of': results[0]['analysis'],
    'inputs': list(paths),
    'labels': list(labels),
    'summaries': [summary(r) for r in results],
    'table': table(results, labels),
  }
  return plot(results, labels), numbers
