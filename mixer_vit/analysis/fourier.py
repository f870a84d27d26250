"""Fourier analysis of feature maps: do attention blocks lower the high frequencies (low-pass) and
convolutions raise them (high-pass)? (Park & Kim 2022, claim 2.)

Per sub-block (`features`), the 2-D FFT over the spatial axes of its output feature map; the log
amplitude log|F| averaged over channels and examples, then over each ring of equal normalised
frequency max(|f_rows|, |f_cols|) / 0.5 * pi (0 .. pi; a map of side n has n // 2 + 1 rings), and
taken relative to frequency 0: the curve Delta log amplitude(f) = log A(f) - log A(0). Its value
at the highest frequency (pi) is the block's *high-frequency Delta log amplitude*, plotted against
normalised depth (block index / number of blocks; 0 is the first block's input, the embedding
or stem output) with the block kinds marked. Each block's
*change* is that value of its output minus that of its input: negative where the block removes
high frequencies relative to the mean (a blur), positive where it adds them (a sharpening). A
block that downsamples (the first unit of a ResNet stage) is compared across resolutions, each
map's frequencies normalised to its own pi.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit.analysis import common
from mixer_vit.analysis import features

EPS = 1e-8


def ring_index(height: int, width: int) -> np.ndarray:
  """(H, W) ring of each FFT bin: round(max(|f_h| / 0.5, |f_w| / 0.5) * (min(H, W) // 2))."""
  fh = np.abs(np.fft.fftfreq(height)) / 0.5
  fw = np.abs(np.fft.fftfreq(width)) / 0.5
  radius = np.maximum(fh[:, None], fw[None, :])
  return np.rint(radius * (min(height, width) // 2)).astype(np.int32)


def log_amplitude_rings(fmap: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, rings): channel-averaged log amplitude per frequency ring."""
  b, h, w, _ = fmap.shape
  amplitude = jnp.abs(jnp.fft.fft2(fmap.astype(jnp.float32), axes=(1, 2)))
  log_amp = jnp.mean(jnp.log(amplitude + EPS), axis=-1)  # (B, H, W)
  rings = ring_index(h, w)
  onehot = np.eye(rings.max() + 1, dtype=np.float32)[rings.reshape(-1)]  # (H*W, R)
  return jnp.reshape(log_amp, (b, h * w)) @ (onehot / onehot.sum(0))


def relative_log_amplitude(fmap: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, rings): Delta log amplitude relative to frequency 0 (module docstring)."""
  rings = log_amplitude_rings(fmap)
  return rings - rings[:, :1]


def high_frequency_delta(fmap: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B,): Delta log amplitude at the highest frequency (pi)."""
  return relative_log_amplitude(fmap)[:, -1]


def high_frequency_change(before: jax.Array, after: jax.Array) -> jax.Array:
  """(B,): how much a block raised (> 0) or lowered (< 0) the high-frequency Delta."""
  return high_frequency_delta(after) - high_frequency_delta(before)


def analyse(subject: common.Subject, *, batch_size: int = 64, mesh: Any = None) -> dict[str, Any]:
  """Per-block curves and high-frequency values over the subject's examples (JSON-ready)."""
  grid = features.token_grid(subject.model_config, subject.images.shape[1:3])
  model, config = subject.model, subject.model_config

  def sums(params, images, mask):
    _, blocks = features.capture(model, params, images, config, grid)
    # Depth 0: the input of the first block (the embedding / stem output), unchanged by it.
    first = blocks[0].input
    blocks = [features.Block('input', 'input', first, first), *blocks]
    out = []
    for block in blocks:
      if min(block.output.shape[1:3]) < 2 or min(block.input.shape[1:3]) < 2:
        out.append(None)  # A 1x1 map has no frequency but 0.
        continue
      curve = relative_log_amplitude(block.output)
      change = high_frequency_change(block.input, block.output)
      out.append((jnp.sum(curve * mask[:, None], 0), jnp.sum(change * mask)))
    return out, jnp.sum(mask)

  names = [('input', 'input')]
  names += features.block_names(model, subject.params, subject.images[:1].shape, config)
  totals, count = common.sharded_sums(
    sums, subject.params, (subject.images,), batch_size=batch_size, mesh=mesh
  )
  blocks = []
  for i, ((name, kind), total) in enumerate(zip(names, totals)):
    row = {'index': i, 'depth': i / (len(names) - 1), 'name': name, 'kind': kind}
    if total is None:
      row.update(curve=None, high_frequency=None, change=None)
    else:
      curve = np.asarray(total[0]) / count
      row['frequencies'] = list(np.linspace(0.0, 1.0, len(curve)))  # In units of pi.
      row['curve'] = [float(v) for v in curve]
      row['high_frequency'] = float(curve[-1])
      row['change'] = float(total[1] / count)
    blocks.append(row)
  return {'analysis': 'fourier', **subject.describe(), 'blocks': blocks, **_summary(blocks)}


def _summary(blocks: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean change of the high-frequency Delta per block kind."""
  by_kind: dict[str, list[float]] = {}
  for row in blocks:
    if row['change'] is not None and row['kind'] != 'input':
      by_kind.setdefault(row['kind'], []).append(row['change'])
  return {'mean_change_by_kind': {k: float(np.mean(v)) for k, v in by_kind.items()}}


def plot(result: dict[str, Any]):
  fig, (left, right) = common.figure(2)
  rows = [r for r in result['blocks'] if r['high_frequency'] is not None]
  common.plot_by_depth(left, rows, 'high_frequency')
  left.set_ylabel('Δ log amplitude at π (vs frequency 0)')
  from matplotlib import colormaps  # noqa: PLC0415  # Imported by common.figure already.

  cmap = colormaps['plasma']
  for r in rows:
    right.plot(r['frequencies'], r['curve'], color=cmap(r['depth']), linewidth=1)
  right.set_xlabel('frequency (× π)')
  right.set_ylabel('Δ log amplitude')
  right.set_title('per block; colour: depth (dark = early)')
  fig.suptitle(common.title(result))
  fig.tight_layout()
  return fig
