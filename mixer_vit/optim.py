"""Learning-rate schedules and optimisers (optax) built from a training config.

The optimiser is a chain: global-norm clipping -> SGD momentum or Adam moments -> peak learning
rate -> decoupled weight decay on kernels -> schedule factor -> descent. Weight decay sits after
the learning rate, so it follows the schedule's shape but not the learning rate's size
("decoupled" as in Loshchilov & Hutter, and as big_vision's ``wd``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('cosine', 'linear', 'constant')
OPTIMIZERS = ('sgd', 'adamw')


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to ``config.lr`` over ``warmup_steps``, then ``config.schedule``."""
  lr, warmup, total = config.lr, config.warmup_steps, config.total_steps
  end = config.get('lr_end', 0.0) or 0.0
  if warmup >= total and total > 0:
    raise ValueError(
      f'warmup_steps ({warmup}) must be smaller than total_steps ({total}); '
      f'lower it, e.g. --config.warmup_steps={total // 10}.'
    )
  decay_steps = max(total - warmup, 1)
  if config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif config.schedule == 'linear':
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif config.schedule == 'constant':
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f'unknown config.schedule {config.schedule!r}; use one of {SCHEDULES}.')
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for the weight matrices/filters (leaves named ``kernel``), False for biases, norms,
  embeddings and tokens, which weight decay leaves alone."""

  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, 'key', getattr(last, 'name', None)) == 'kernel'

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def _dtype(name: str | None):
  return None if name in (None, '', 'None') else jnp.dtype(name)


def make_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
  """The optax optimiser for ``config`` (see the module docstring for its order)."""
  schedule = schedule or make_schedule(config)
  mu_dtype = _dtype(config.get('mu_dtype'))
  parts = []
  if config.get('grad_clip_norm'):
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'sgd':
    if config.momentum:
      parts.append(optax.trace(decay=config.momentum, accumulator_dtype=mu_dtype))
  elif config.optimizer == 'adamw':
    parts.append(optax.scale_by_adam(b1=config.momentum, b2=config.b2, mu_dtype=mu_dtype))
  else:
    raise ValueError(f'unknown config.optimizer {config.optimizer!r}; use one of {OPTIMIZERS}.')
  parts.append(optax.scale(config.lr))
  if config.get('weight_decay'):
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
  if config.lr:
    parts.append(optax.scale_by_schedule(lambda count: schedule(count) / config.lr))
  parts.append(optax.scale(-1.0))
  return optax.chain(*parts)
