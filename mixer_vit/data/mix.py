"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) of training batches, with soft labels.

Set by ``config.mixup`` and ``config.cutmix`` (``DataConfig.mixup`` / ``.cutmix``, each None or
``{'p': probability, 'alpha': Beta concentration}``; off by default). The input pipeline applies
them to each process's local batch after preprocessing (float images, one-hot or smoothed
labels), and never to evaluation batches.

Per batch, one uniform draw picks mixup (probability ``mixup.p``), CutMix (``cutmix.p``) or
neither; the two ``p`` add up to at most 1. timm's ``Mixup(prob=P, switch_prob=S)`` with both
alphas set is ``mixup.p = P (1 - S)``, ``cutmix.p = P S``; AugReg's / big_vision's mixup is
``{'p': 1, 'alpha': A}`` with A what big_vision calls ``mixup.p`` (0.2, 0.5, 0.8).

- Mixup (big_vision's ``utils.mixup`` with one weight per batch): ``lam ~ Beta(alpha, alpha)``;
  example ``i`` becomes ``lam x_i + (1 - lam) x_{i+1}`` (the batch rolled by one, the last example
  taking the first), and its labels ``lam y_i + (1 - lam) y_{i+1}``.
- CutMix (timm's ``rand_bbox`` with the corrected weight): ``lam ~ Beta(alpha, alpha)``; a box of
  ``int(H sqrt(1 - lam))`` x ``int(W sqrt(1 - lam))`` pixels at a uniform centre, clipped to the
  image, is pasted from example ``i + 1`` into example ``i``, the same box for the whole batch;
  the labels take the weight ``1 - box area / (H W)``.

Labels stay distributions (each row sums to one when the input's do), which is what the losses
(softmax or sigmoid cross-entropy on label distributions) take as they are.

The randomness of the batch of step ``s`` in process ``p`` is a stateless function of
(seed, p, s): a resumed run mixes exactly as an uninterrupted one, and the local batch, hence its
mixing, does not depend on the number of devices.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from mixer_vit.data import base

MIX_SALT = 0x313C5


def batch_key(seed: int, process_index: int, step) -> tf.Tensor:
  """The seed (shape [2]) of the mixing of one process's batch at ``step``."""
  key = tf.constant([seed, MIX_SALT], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, process_index)
  return tf.random.experimental.stateless_fold_in(key, tf.cast(step, tf.int64))


def _beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
  """One Beta(alpha, alpha) sample (float32) as a ratio of Gamma samples."""
  g = tf.random.stateless_gamma([2], seed=seed, alpha=alpha, dtype=tf.float64)
  lam = g[0] / (g[0] + g[1])
  return tf.cast(tf.where(tf.math.is_finite(lam), lam, 0.5), tf.float32)


def _cutmix_box(lam: tf.Tensor, centre: tf.Tensor, height: tf.Tensor, width: tf.Tensor):
  """(top, bottom, left, right) of timm's box for the kept fraction ``lam``."""
  ratio = tf.sqrt(1.0 - lam)
  h = tf.cast(tf.cast(height, tf.float32) * ratio, tf.int32)
  w = tf.cast(tf.cast(width, tf.float32) * ratio, tf.int32)
  cy = tf.minimum(tf.cast(centre[0] * tf.cast(height, tf.float32), tf.int32), height - 1)
  cx = tf.minimum(tf.cast(centre[1] * tf.cast(width, tf.float32), tf.int32), width - 1)
  top = tf.clip_by_value(cy - h // 2, 0, height)
  bottom = tf.clip_by_value(cy + h // 2, 0, height)
  left = tf.clip_by_value(cx - w // 2, 0, width)
  right = tf.clip_by_value(cx + w // 2, 0, width)
  return top, bottom, left, right


def mix_batch(
  batch: dict[str, tf.Tensor],
  seed: tf.Tensor,
  mixup: base.MixOption | None = None,
  cutmix: base.MixOption | None = None,
) -> dict[str, tf.Tensor]:
  """Mixes ``batch['image']`` (B, H, W, C) float and ``batch['labels']`` (B, K) with ``seed``."""
  images, labels = batch['image'], batch['labels']
  partner = tf.roll(images, shift=-1, axis=0)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
  u = tf.random.stateless_uniform([3], seeds[0])

  def none():
    return images, tf.constant(1.0)

  def do_mixup():
    lam = _beta(seeds[1], mixup.alpha)
    return lam * images + (1.0 - lam) * partner, lam

  def do_cutmix():
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    top, bottom, left, right = _cutmix_box(_beta(seeds[2], cutmix.alpha), u[1:], height, width)
    rows = tf.range(height)[None, :, None, None]
    cols = tf.range(width)[None, None, :, None]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    area = tf.cast((bottom - top) * (right - left), tf.float32)
    lam = 1.0 - area / tf.cast(height * width, tf.float32)
    return tf.where(inside, partner, images), lam

  branches, bounds = [none], []
  for option, fn in ((mixup, do_mixup), (cutmix, do_cutmix)):
    if option is not None:
      bounds.append((bounds[-1] if bounds else 0.0) + option.p)
      branches.append(fn)
  # Branch k + 1 when u[0] falls in [bounds[k - 1], bounds[k]); branch 0 (unmixed) past them all.
  index = tf.constant(0)
  for k in reversed(range(len(bounds))):
    index = tf.where(u[0] < bounds[k], k + 1, index)
  mixed, lam = tf.switch_case(index, branches)
  mixed.set_shape(images.shape)
  lam = tf.cast(lam, labels.dtype)
  mixed_labels = lam * labels + (1 - lam) * tf.roll(labels, shift=-1, axis=0)
  return {**batch, 'image': tf.cast(mixed, images.dtype), 'labels': mixed_labels}


def batch_fn(
  config: base.DataConfig, process_index: int
) -> Callable[[tf.Tensor, dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
  """``(step, batch) -> mixed batch`` of process ``process_index`` (for ``Dataset.map``)."""
  seed, mixup, cutmix = config.seed, config.mixup, config.cutmix

  def fn(step, batch):
    return mix_batch(batch, batch_key(seed, process_index, step), mixup, cutmix)

  return fn
