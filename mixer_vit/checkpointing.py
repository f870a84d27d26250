"""Train-state checkpoints in the workdir with Orbax (``WORKDIR/checkpoints/<step>/``).

Saves every ``checkpoint_every`` steps and at the end, keeps the last ``keep_checkpoints``, writes
in the background while training goes on (asynchronous). Every process calls these functions;
Orbax coordinates who writes what. For the portable ``.npz`` parameter files see
``mixer_vit.checkpoint``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


def make_manager(workdir: str, config: ml_collections.ConfigDict | None = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A manager for ``workdir``'s train-state checkpoints, following the config's policy."""
  every = config.checkpoint_every if config is not None else 1
  keep = config.keep_checkpoints if config is not None else None
  async_save = bool(config.get('async_checkpoints', True)) if config is not None else False
  if every is not None and every <= 0:
    raise ValueError(f'checkpoint_every must be positive (got {every}).')
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every or 1),
      preservation_policy=ocp.checkpoint_managers.LatestN(keep or None),
      enable_async_checkpointing=async_save,
      read_only=read_only,
      create=not read_only,
  )
  path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  return ocp.CheckpointManager(path, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
  """Saves ``state`` at ``step`` when the policy says so (always with ``force``)."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """The state saved at ``step`` (default: the latest), laid out like ``abstract_state``
  (a tree of ``jax.ShapeDtypeStruct`` with shardings, e.g. from ``jax.eval_shape``)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}.')
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shapes and dtypes of ``tree`` placed with ``sharding``: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
