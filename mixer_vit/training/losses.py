"""Classification losses on one-hot (possibly smoothed) labels, per example."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of softmax(logits) against label distributions; shape (B,)."""
  return -jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Independent binary cross-entropies summed over classes (the Mixer/big_vision loss); (B,)."""
  logits = logits.astype(jnp.float32)
  return -jnp.sum(
    labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits), axis=-1
  )


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  'softmax_xent': softmax_xent,
  'sigmoid_xent': sigmoid_xent,
}


def get_loss_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  if name not in LOSSES:
    raise ValueError(f'unknown config.loss {name!r}; use one of {sorted(LOSSES)}.')
  return LOSSES[name]
