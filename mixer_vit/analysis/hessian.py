"""Hessian eigenvalues of the loss per mini-batch (Park & Kim 2022, claim 1: attention flattens the
loss landscape, i.e. smaller top eigenvalues, and small-data ViTs show negative ones).

The Hessian is never formed: a Hessian-vector product is `jax.jvp` of `jax.grad` of the mini-batch
loss (mean softmax cross-entropy, evaluation mode) over all parameters, flattened to one vector.
- `power_iteration`: v <- Hv / |Hv| until the Rayleigh quotient v.Hv settles (relative change
  below `tol`); it converges to the eigenvalue of largest magnitude, with its sign.
- `top_eigenvalue`: the largest (algebraic) eigenvalue: power iteration, and when that finds a
  negative one, power iteration again with its eigenvector deflated, until a positive one is
  found; the first (most negative) one is reported too.
- `lanczos`: `k` steps of the Lanczos recurrence with full re-orthogonalisation; the eigenvalues
  of the k x k tridiagonal matrix (Ritz values) approximate the extremes of the spectrum, largest
  and most negative alike (k >= the dimension gives them all exactly).
`analyse` takes `batches` mini-batches of `batch_size` examples and reports the largest eigenvalue
of each (the "max eigenvalue spectrum" as a histogram), with optional Lanczos top-k and bottom
values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from mixer_vit.analysis import common
from mixer_vit.runtime import parallel

Vector = jax.Array
HVP = Callable[[Vector], Vector]


def hvp_fn(loss: Callable[[Vector], jax.Array], point: Vector) -> HVP:
  """v -> H v at `point`, H the Hessian of `loss` (a function of a flat vector)."""
  return lambda v: jax.jvp(jax.grad(loss), (point,), (v,))[1]


def power_iteration(
  hvp: HVP, dim: int, key: jax.Array, *, max_iterations: int = 200, tol: float = 1e-6
) -> tuple[float, np.ndarray, int]:
  """(eigenvalue of largest magnitude, its unit eigenvector, iterations used)."""
  v = jax.random.normal(key, (dim,), jnp.float32)
  v = v / jnp.linalg.norm(v)
  eigenvalue = None
  for iteration in range(1, max_iterations + 1):
    hv = hvp(v)
    estimate = float(jnp.vdot(v, hv))
    size = float(jnp.linalg.norm(hv))
    if size == 0.0:
      return 0.0, np.asarray(v), iteration
    v = hv / size
    if eigenvalue is not None and abs(estimate - eigenvalue) <= tol * abs(estimate):
      return estimate, np.asarray(v), iteration
    eigenvalue = estimate
  return eigenvalue, np.asarray(v), max_iterations


def top_eigenvalue(
  hvp: HVP,
  dim: int,
  key: jax.Array,
  *,
  max_iterations: int = 200,
  tol: float = 1e-6,
  max_deflations: int = 8,
) -> tuple[float, float | None, int]:
  """(largest eigenvalue, the most negative one when it dominates in magnitude else None,
  iterations used in all).

  When power iteration lands on a negative eigenvalue it is deflated (H restricted to the
  complement of its eigenvector) and the iteration repeats, up to `max_deflations` times. A shift
  (H - lambda_neg I) would do in exact arithmetic, but a network's millions of near-zero
  eigenvalues then sit next to the shift, and the Rayleigh quotient settles there long before the
  top eigenvalue surfaces."""
  found: list[np.ndarray] = []
  negative = None
  used = 0

  def deflated(v):
    for u in found:
      v = v - jnp.vdot(u, v) * u
    hv = hvp(v)
    for u in found:
      hv = hv - jnp.vdot(u, hv) * u
    return hv

  for _ in range(max_deflations + 1):
    value, vector, more = power_iteration(
      deflated, dim, key, max_iterations=max_iterations, tol=tol
    )
    used += more
    if value >= 0:
      return value, negative, used
    negative = value if negative is None else negative
    found.append(jnp.asarray(vector))
  return value, negative, used


def lanczos(hvp: HVP, dim: int, key: jax.Array, num_steps: int) -> np.ndarray:
  """Ritz values of `num_steps` Lanczos steps (full re-orthogonalisation), largest first."""
  num_steps = min(num_steps, dim)
  basis = np.zeros((num_steps, dim), np.float64)
  alphas, betas = [], []
  v = np.asarray(jax.random.normal(key, (dim,), jnp.float32), np.float64)
  v /= np.linalg.norm(v)
  for j in range(num_steps):
    basis[j] = v
    w = np.asarray(hvp(jnp.asarray(v, jnp.float32)), np.float64)
    alpha = float(w @ v)
    alphas.append(alpha)
    # Full re-orthogonalisation (twice, for float32 products) against every basis vector.
    for _ in range(2):
      w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
    beta = float(np.linalg.norm(w))
    if j == num_steps - 1 or beta < 1e-10 * max(1.0, abs(alpha)):
      break
    betas.append(beta)
    v = w / beta
  k = len(alphas)
  tridiagonal = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
  return np.sort(np.linalg.eigvalsh(tridiagonal))[::-1]


def batch_loss(model: Any, unravel: Callable) -> Callable:
  """`(flat_params, images, labels) -> mean cross-entropy` of `model` (evaluation mode)."""

  def loss(flat, images, labels):
    logits = model.apply({'params': unravel(flat)}, images, train=False)
    return jnp.mean(common.cross_entropy(logits, labels))

  return loss


def analyse(
  subject: common.Subject,
  *,
  batch_size: int = 64,
  batches: int = 10,
  iterations: int = 100,
  tol: float = 1e-4,
  lanczos_steps: int = 0,
  seed: int = 0,
  mesh: Any = None,
) -> dict[str, Any]:
  """Top eigenvalue (and Lanczos values) per mini-batch of the subject's examples."""
  mesh = mesh or parallel.make_mesh()
  if batch_size % mesh.size:
    raise ValueError(
      f'--batch_size={batch_size} must be a multiple of the {mesh.size} devices (the mini-batch '
      'is split over them)'
    )
  available = len(subject.labels) // batch_size
  if available < 1:
    raise ValueError(
      f'--examples={len(subject.labels)} is fewer than one --batch_size={batch_size}; raise '
      '--examples'
    )
  batches = min(batches, available)
  flat, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), subject.params))
  repl, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  loss = batch_loss(subject.model, unravel)
  hvp_step = jax.jit(
    lambda p, x, y, v: jax.jvp(jax.grad(lambda q: loss(q, x, y)), (p,), (v,))[1],
    in_shardings=(repl, split, split, repl),
    out_shardings=repl,
  )
  loss_step = jax.jit(loss, in_shardings=(repl, split, split), out_shardings=repl)
  flat = jax.device_put(flat, repl)
  keys = jax.random.split(jax.random.key(seed), batches)
  rows = []
  for i in range(batches):
    images = jax.device_put(subject.images[i * batch_size : (i + 1) * batch_size], split)
    labels = jax.device_put(subject.labels[i * batch_size : (i + 1) * batch_size], split)
    hvp = lambda v, x=images, y=labels: hvp_step(flat, x, y, jax.device_put(v, repl))  # noqa: E731
    top, negative, used = top_eigenvalue(
      hvp, flat.size, keys[i], max_iterations=iterations, tol=tol
    )
    row = {'batch': i, 'loss': float(loss_step(flat, images, labels)), 'top': top}
    row.update(dominant_negative=negative, iterations=used)
    if lanczos_steps:
      ritz = lanczos(hvp, flat.size, keys[i], lanczos_steps)
      row['lanczos'] = [float(r) for r in ritz]
    rows.append(row)
  tops = np.array([r['top'] for r in rows])
  result = {
    'analysis': 'hessian',
    **subject.describe(),
    'parameters': int(flat.size),
    'batch_size': batch_size,
    'batches': rows,
    'top_median': float(np.median(tops)),
    'top_mean': float(np.mean(tops)),
    'top_min': float(np.min(tops)),
    'top_max': float(np.max(tops)),
    'negative_top': int(np.sum(tops < 0)),
    # Mini-batches whose most negative eigenvalue outweighs the largest positive one.
    'dominant_negative': int(sum(r['dominant_negative'] is not None for r in rows)),
  }
  if lanczos_steps:
    bottoms = np.array([r['lanczos'][-1] for r in rows])
    result['lanczos_steps'] = lanczos_steps
    result['lanczos_min_median'] = float(np.median(bottoms))
    result['negative_lanczos_min'] = int(np.sum(bottoms < 0))
  return result


def plot(result: dict[str, Any]):
  fig, (ax,) = common.figure(1)
  tops = [r['top'] for r in result['batches']]
  ax.hist(tops, bins=max(5, min(30, len(tops))), color='tab:blue', alpha=0.8, label='top (power)')
  if 'lanczos_steps' in result:
    bottoms = [r['lanczos'][-1] for r in result['batches']]
    ax.hist(bottoms, bins=max(5, min(30, len(bottoms))), color='tab:red', alpha=0.6,
            label=f'lowest of {result["lanczos_steps"]} Lanczos')  # fmt: skip
    ax.legend()
  ax.axvline(result['top_median'], color='0.2', linestyle='--', linewidth=1)
  ax.set_xlabel('Hessian eigenvalue per mini-batch')
  ax.set_ylabel('mini-batches')
  ax.set_title(
    f'{common.title(result)}\nbatch {result["batch_size"]}, median top {result["top_median"]:.4g}',
    fontsize=9,
  )
  fig.tight_layout()
  return fig
