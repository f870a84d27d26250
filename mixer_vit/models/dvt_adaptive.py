"""Adaptive inference of a Dynamic ViT cascade (`models.dvt`): early exits, thresholds, budgets.

An image leaves at the first stage k whose top softmax probability exceeds `thresholds[k]`; the
last stage always answers. So thresholds of 0 make every image leave at the first stage, and
thresholds of 1 (never exceeded) keep every image to the last.

- `AdaptiveCascade.predict`: batched, as it serves: stage 1 on the whole batch, then each next stage
  only on the images still in play (with the reuse state of their previous stage), padded up to
  one of a few fixed batch sizes (`buckets`) so that each stage compiles once per bucket, never
  per batch.
- `exit_stages`, `operating_point`: the same rule applied to every stage's probabilities computed
  once (stage k's output for an image does not depend on the other images, so the result is the
  batched path's): accuracy, mean FLOPs per image and the share of images leaving at each stage.
- `budget_thresholds`: thresholds for a mean FLOPs budget, chosen on held-out examples by the rule
  of the paper (after MSDNet): for q > 0 the share of images leaving at stage k is set
  proportional to q**k, each stage's threshold being the top probability that lets that share of
  the held-out images out; among the values of q (and all-exit-at-the-first-stage) whose mean FLOPs
  on the held-out images are within the budget, the one with the best held-out accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Batch axis of each entry of a stage's reuse state (models.dvt.DynamicViT.run_stage).
_STATE_BATCH_AXIS = {'tokens': 0, 'logits': 1}
# The values of q tried by `budget_thresholds` (exit shares proportional to q**k).
BUDGET_Q = tuple(float(q) for q in np.geomspace(1e-3, 1e3, 121))


def bucket_sizes(batch_size: int, count: int = 4) -> tuple[int, ...]:
  """The padded batch sizes a cascade's later stages run at: batch_size / 2**i, i < count
  (rounded up), e.g. 64 -> (8, 16, 32, 64)."""
  return tuple(sorted({-(-batch_size // 2**i) for i in range(count)}))


def _bucket(n: int, buckets: Sequence[int]) -> int:
  return next((b for b in buckets if b >= n), n)


def _take(state: dict[str, Any], index: np.ndarray, size: int) -> dict[str, Any]:
  """The reuse state's rows `index`, zero-padded to `size` rows."""
  out = {}
  for key, value in state.items():
    axis = _STATE_BATCH_AXIS[key]
    value = jnp.take(value, jnp.asarray(index), axis=axis)
    pad = [(0, 0)] * value.ndim
    pad[axis] = (0, size - len(index))
    out[key] = jnp.pad(value, pad)
  return out


class AdaptiveCascade:
  """Runs a `DynamicViT` with early exits on batches of preprocessed images (module docstring)."""

  def __init__(self, model: Any, params: Any, batch_size: int, buckets: Sequence[int] = ()):
    self.model = model
    self.params = params
    self.batch_size = batch_size
    self.buckets = tuple(sorted(buckets)) or bucket_sizes(batch_size)
    self._stages = [
      jax.jit(
        lambda p, x, prev, k=k: model.apply(
          {'params': p}, x, k, prev, train=False, method=model.run_stage
        )
      )
      for k in range(model.num_stages)
    ]

  def predict(self, images: np.ndarray, thresholds: Sequence[float]):
    """(probabilities (N, classes) of the stage each image left at, that stage (N,)) for images
    (N, H, W, 3), in batches of `batch_size`."""
    probs, stages = [], []
    for start in range(0, len(images), self.batch_size):
      p, s = self._predict_batch(np.asarray(images[start : start + self.batch_size]), thresholds)
      probs.append(p)
      stages.append(s)
    return np.concatenate(probs), np.concatenate(stages)

  def _predict_batch(self, images: np.ndarray, thresholds: Sequence[float]):
    n = len(images)
    k_last = self.model.num_stages - 1
    if len(thresholds) < k_last:
      raise ValueError(
        f'{len(thresholds)} thresholds for a cascade of {k_last + 1} stages; give one per stage '
        '(the last stage always answers)'
      )
    out_probs, out_stage = None, np.full((n,), k_last, np.int32)
    active = np.arange(n)  # Rows of `images` still in play.
    state = {}  # Their reuse state, in the order of `active`.
    for k in range(k_last + 1):
      size = self.batch_size if k == 0 else _bucket(len(active), self.buckets)
      x = np.zeros((size, *images.shape[1:]), np.float32)
      x[: len(active)] = images[active]
      prev = _take(state, np.arange(len(active)), size) if k else None
      logits, state = self._stages[k](self.params, jnp.asarray(x), prev)
      probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))[: len(active)]
      if out_probs is None:
        out_probs = np.zeros((n, probs.shape[-1]), np.float32)
      leave = np.ones(len(active), bool) if k == k_last else probs.max(-1) > thresholds[k]
      out_probs[active[leave]] = probs[leave]
      out_stage[active[leave]] = k
      if k < k_last:
        stay = np.flatnonzero(~leave)
        if not len(stay):
          break
        state = _take(state, stay, len(stay))
        active = active[stay]
    return out_probs, out_stage


def exit_stages(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
  """(N,) the stage each image leaves at, from every stage's probabilities (K, N, classes)."""
  top = np.asarray(probs).max(-1)  # (K, N)
  k_last = top.shape[0] - 1
  confident = top[:k_last] > np.asarray(thresholds, np.float64)[:k_last, None]
  confident = np.concatenate([confident, np.ones((1, top.shape[1]), bool)])
  return np.argmax(confident, axis=0).astype(np.int32)


def operating_point(
  probs: np.ndarray, labels: np.ndarray, thresholds: Sequence[float], flops: Sequence[float]
) -> dict[str, Any]:
  """Accuracy, mean FLOPs per image (`flops[k]`: an image leaving after stage k) and the share of
  images leaving at each stage, with `thresholds`, from every stage's probabilities (K, N, C)."""
  probs = np.asarray(probs)
  stages = exit_stages(probs, thresholds)
  predictions = np.argmax(probs[stages, np.arange(probs.shape[1])], axis=-1)
  k = probs.shape[0]
  return {
    'thresholds': [float(t) for t in thresholds[: k - 1]],
    'accuracy': float(np.mean(predictions == np.asarray(labels))),
    'mean_flops': float(np.mean(np.asarray(flops, np.float64)[stages])),
    'exit_shares': [float(s) for s in np.bincount(stages, minlength=k) / len(stages)],
  }


def shares_thresholds(probs: np.ndarray, shares: Sequence[float]) -> list[float]:
  """Thresholds that let (about) `shares[k]` of the images out at stage k (K-1 thresholds): at
  each stage the most confident of the images still in play leave."""
  top = np.asarray(probs).max(-1)
  n = top.shape[1]
  remaining = np.ones(n, bool)
  thresholds = []
  for k in range(top.shape[0] - 1):
    values = np.sort(top[k][remaining])[::-1]
    count = min(int(round(shares[k] * n)), len(values))
    if count == 0:
      t = 1.0  # None leaves.
    elif count == len(values):
      t = 0.0  # All leave.
    else:  # The (count+1)-th largest: the `count` above it leave (ties may keep some back).
      t = float(values[count])
    thresholds.append(t)
    remaining &= ~(top[k] > t)
  return thresholds


def budget_thresholds(
  probs: np.ndarray, labels: np.ndarray, flops: Sequence[float], budget: float
) -> dict[str, Any]:
  """The thresholds for a mean FLOPs `budget` per image, chosen on held-out examples (every
  stage's probabilities (K, N, C) and their labels; module docstring). Returns the chosen
  `operating_point` on those examples, with `q`. Raises a ValueError when even the first stage
  alone costs more than the budget."""
  k = np.asarray(probs).shape[0]
  if budget < flops[0]:
    raise ValueError(
      f'the budget of {budget / 1e9:.6g} GFLOPs per image is below the first stage alone '
      f'({flops[0] / 1e9:.6g} GFLOPs); raise --budget'
    )
  best = operating_point(probs, labels, [0.0] * (k - 1), flops)  # Every image leaves first.
  best['q'] = 0.0
  for q in BUDGET_Q:
    shares = q ** np.arange(k)
    point = operating_point(probs, labels, shares_thresholds(probs, shares / shares.sum()), flops)
    if point['mean_flops'] <= budget and point['accuracy'] > best['accuracy']:
      best = {**point, 'q': q}
  return best
