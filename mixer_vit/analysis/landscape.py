"""Loss landscape around the trained parameters along filter-normalised random directions
(Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"), as Park & Kim 2022 plot it.

A direction d has a Gaussian entry per parameter, then each *filter* of d (the slice along the
last axis of a kernel: one output unit of a dense layer, one output channel of a convolution, one
output feature of an attention projection) is scaled to the norm of the same filter of the
parameters; vectors (biases, normalisation scales) get no component (d = 0), as in Li et al.'s
"ignore biases and BN". The loss (mean softmax cross-entropy, evaluation mode) and accuracy over
the subject's examples are evaluated at theta + a d1 (1-D) or theta + a d1 + b d2 (2-D) for a, b
on a grid of `steps` values in [-span, span] (an odd `steps` includes 0, the trained point).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mixer_vit.analysis import common


def filter_normalised_direction(seed: int, params: Any) -> Any:
  """A random direction shaped like `params` (module docstring), drawn from numpy's generator
  with `seed`."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  out = []
  for w in leaves:
    w = np.asarray(w, np.float32)
    if w.ndim <= 1:
      out.append(np.zeros_like(w))
      continue
    d = rng.standard_normal(w.shape, dtype=np.float32)
    axes = tuple(range(w.ndim - 1))
    w_norm = np.sqrt(np.sum(w**2, axis=axes, keepdims=True))
    d_norm = np.sqrt(np.sum(d**2, axis=axes, keepdims=True))
    out.append(d * w_norm / np.maximum(d_norm, 1e-12))
  return jax.tree.unflatten(treedef, out)


def grid_values(steps: int, span: float) -> np.ndarray:
  if steps < 2:
    raise ValueError(f'--steps must be at least 2, got {steps}')
  if span <= 0:
    raise ValueError(f'--span must be positive, got {span}')
  return np.linspace(-span, span, steps)


def analyse(
  subject: common.Subject,
  *,
  dims: int = 2,
  steps: int = 11,
  span: float = 1.0,
  seed: int = 0,
  batch_size: int = 64,
  mesh: Any = None,
) -> dict[str, Any]:
  """Loss and accuracy on the grid (JSON-ready; 2-D values indexed [a][b]); the directions are
  drawn with seeds 2 `seed` and 2 `seed` + 1."""
  if dims not in (1, 2):
    raise ValueError(f'--dims must be 1 or 2, got {dims}')
  values = grid_values(steps, span)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), subject.params)
  directions = [filter_normalised_direction(seed * 2 + i, params) for i in range(dims)]
  evaluate = common.loss_and_correct_sums(subject.model)

  def at(params, images, labels, mask, coefficients, d1, d2):
    moved = jax.tree.map(
      lambda w, a, b: w + coefficients[0] * a + coefficients[1] * b, params, d1, d2
    )
    return evaluate(moved, images, labels, mask)

  d2 = directions[1] if dims == 2 else jax.tree.map(np.zeros_like, params)
  n = len(subject.labels)
  points = [(a, b) for a in values for b in (values if dims == 2 else [0.0])]
  losses, accuracies = [], []
  for a, b in points:
    loss, correct = common.sharded_sums(
      at,
      params,
      (subject.images, subject.labels),
      batch_size=batch_size,
      mesh=mesh,
      extra=(np.array([a, b], np.float32), directions[0], d2),
    )
    losses.append(float(loss / n))
    accuracies.append(float(correct / n))
  shape = (steps, steps) if dims == 2 else (steps,)
  return {
    'analysis': 'landscape',
    **subject.describe(),
    'dims': dims,
    'seed': seed,
    'coordinates': [float(v) for v in values],
    'loss': np.reshape(losses, shape).tolist(),
    'accuracy': np.reshape(accuracies, shape).tolist(),
    'loss_at_origin': _at_origin(losses, values, dims),
  }


def _at_origin(losses: list[float], values: np.ndarray, dims: int) -> float | None:
  zero = np.flatnonzero(values == 0.0)
  if not len(zero):
    return None
  i = int(zero[0])
  return losses[i * len(values) + i] if dims == 2 else losses[i]


def plot(result: dict[str, Any]):
  fig, (ax,) = common.figure(1, width=5.5 if result['dims'] == 2 else 6.0)
  coords = np.asarray(result['coordinates'])
  loss = np.asarray(result['loss'])
  if result['dims'] == 1:
    ax.plot(coords, loss, color='tab:blue', marker='o', markersize=3)
    ax.set_xlabel('step along the direction')
    ax.set_ylabel('loss')
  else:
    a, b = np.meshgrid(coords, coords, indexing='ij')
    contour = ax.contourf(a, b, np.log(loss), levels=20, cmap='viridis')
    fig.colorbar(contour, ax=ax, label='log loss')
    ax.plot([0], [0], marker='+', color='white', markersize=10)
    ax.set_xlabel('direction 1')
    ax.set_ylabel('direction 2')
  ax.set_title(f'{common.title(result)}\nfilter-normalised directions', fontsize=9)
  fig.tight_layout()
  return fig
