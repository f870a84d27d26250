"""Feature-map variance per block: do attention blocks reduce it and convolutions increase it?
(Park & Kim 2022, claim 4.)

Per sub-block (`features`), the variance of its output feature map over all positions and
channels of one example, averaged over the examples; and its *ratio* to the variance of the
block's input (> 1: the block increased the variance). Depth 0 is the first block's input (the
embedding or stem output).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from mixer_vit.analysis import common
from mixer_vit.analysis import features


def map_variance(fmap) -> Any:
  """(B, H, W, C) -> (B,): variance over positions and channels."""
  return jnp.var(fmap.astype(jnp.float32), axis=(1, 2, 3))


def analyse(subject: common.Subject, *, batch_size: int = 64, mesh: Any = None) -> dict[str, Any]:
  grid = features.token_grid(subject.model_config, subject.images.shape[1:3])
  model, config = subject.model, subject.model_config

  def sums(params, images, mask):
    _, blocks = features.capture(model, params, images, config, grid)
    first = blocks[0].input  # Depth 0: the first block's input (embedding / stem output).
    blocks = [features.Block('input', 'input', first, first), *blocks]
    return [
      (jnp.sum(map_variance(b.output) * mask), jnp.sum(map_variance(b.input) * mask))
      for b in blocks
    ], jnp.sum(mask)

  names = [('input', 'input')]
  names += features.block_names(model, subject.params, subject.images[:1].shape, config)
  totals, count = common.sharded_sums(
    sums, subject.params, (subject.images,), batch_size=batch_size, mesh=mesh
  )
  blocks = []
  for i, ((name, kind), (out, inp)) in enumerate(zip(names, totals)):
    variance, before = float(out / count), float(inp / count)
    blocks.append(
      {
        'index': i,
        'depth': i / (len(names) - 1),
        'name': name,
        'kind': kind,
        'variance': variance,
        'input_variance': before,
        'ratio': variance / before if before > 0 else None,
      }
    )
  by_kind: dict[str, list[float]] = {}
  for row in blocks:
    if row['ratio'] is not None and row['kind'] != 'input':
      by_kind.setdefault(row['kind'], []).append(np.log(row['ratio']))
  return {
    'analysis': 'variance',
    **subject.describe(),
    'blocks': blocks,
    # Geometric mean of the output / input variance ratio per kind.
    'mean_ratio_by_kind': {k: float(np.exp(np.mean(v))) for k, v in by_kind.items()},
  }


def plot(result: dict[str, Any]):
  fig, (ax,) = common.figure(1)
  rows = result['blocks']
  common.plot_by_depth(ax, rows, 'variance')
  ax.set_yscale('log')
  ax.set_ylabel('feature-map variance')
  ax.set_title(common.title(result), fontsize=9)
  fig.tight_layout()
  return fig
