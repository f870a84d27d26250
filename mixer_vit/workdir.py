"""The workdir of a training run: every file in it is named, written and read here.

  WORKDIR/
    config.json            the resolved training config
    dataset_info.json      class count and names, input image shape, split sizes
    checkpoints/<step>/    Orbax train-state checkpoints (parameters, optimiser state, step)
    metrics.jsonl          one JSON object per write: {"step": S, ...}
    events.out.tfevents.*  TensorBoard
    params.npz             the final parameters, in the released checkpoints' layout

Train-state checkpoints are written every ``checkpoint_every`` steps and at the end, the last
``keep_checkpoints`` kept, asynchronously while training goes on. Every process calls the
checkpoint functions; Orbax coordinates who writes what. ``load_workdir`` rebuilds the model and
its latest parameters from a workdir, which is what the command-line tools start from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from mixer_vit import config_utils
from mixer_vit import data
from mixer_vit import optim
from mixer_vit import params_io
from mixer_vit import steps

CONFIG_FILE = 'config.json'
DATASET_INFO_FILE = 'dataset_info.json'
CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
PARAMS_FILE = 'params.npz'


def is_workdir(path: str) -> bool:
  """True for a training workdir (it holds config.json)."""
  return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_FILE))


def write_json(path: str, value: Any) -> None:
  """Writes ``value`` (JSON text or a JSON-able value) atomically: a temporary file, renamed."""
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(value if isinstance(value, str) else json.dumps(value, indent=2))
  os.replace(tmp, path)


def write_run_files(
  workdir: str,
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  image_shape: tuple[int, ...],
) -> None:
  """``config.json`` and ``dataset_info.json``: what another tool needs to rebuild the model."""
  write_json(os.path.join(workdir, CONFIG_FILE), config_utils.to_json(config))
  class_names = list(info.class_names) if info.class_names is not None else None
  write_json(
    os.path.join(workdir, DATASET_INFO_FILE),
    {
      'num_classes': info.num_classes,
      'class_names': class_names,
      'image_shape': list(image_shape),
      'num_examples': dict(info.num_examples),
    },
  )


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config a run wrote to ``workdir``."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} not found: {workdir} is not a training workdir (run '
      'python -m mixer_vit.main --workdir=... first).'
    )
  with open(path, encoding='utf-8') as f:
    return config_utils.from_json(f.read())


def read_dataset_info(workdir: str) -> dict[str, Any]:
  """``dataset_info.json``: num_classes, class_names, image_shape, num_examples."""
  with open(os.path.join(workdir, DATASET_INFO_FILE), encoding='utf-8') as f:
    return json.load(f)


def save_params(workdir: str, params: Any) -> str:
  """Writes the final parameters to ``params.npz``; returns its path."""
  path = os.path.join(workdir, PARAMS_FILE)
  params_io.save_npz(params, path)
  return path


# ---------------------------------------------------------------------------------------------
# Orbax train-state checkpoints.


def make_manager(
  workdir: str, config: ml_collections.ConfigDict | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
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


def save_checkpoint(
  manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False
) -> bool:
  """Saves ``state`` at ``step`` when the policy says so (always with ``force``)."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_checkpoint(
  manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> Any:
  """The state saved at ``step`` (default: the latest), laid out like ``abstract_state``
  (a tree of ``jax.ShapeDtypeStruct`` with shardings, e.g. from ``abstract_like``)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}.')
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shapes and dtypes of ``tree`` placed with ``sharding``: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# ---------------------------------------------------------------------------------------------
# Reading a run back.


@dataclasses.dataclass
class TrainedModel:
  """What ``load_workdir`` returns: enough to run the model on new images."""

  config: ml_collections.ConfigDict  # The training config (data keys give the preprocessing).
  model_config: ml_collections.ConfigDict
  model: Any  # flax module: model.apply({'params': params}, images, train=False).
  params: Any  # Host (numpy) arrays.
  class_names: list[str] | None
  image_shape: tuple[int, ...]  # (H, W, 3) the model was trained on.
  step: int


def load_workdir(workdir: str, step: int | None = None) -> TrainedModel:
  """The model, config and parameters of the latest (or the given) checkpoint in ``workdir``.

  Works while the training still runs (reads the newest finished checkpoint) and on any device
  count; the parameters come back as numpy arrays.
  """
  config = read_config(workdir)
  info = read_dataset_info(workdir)
  image_shape = tuple(info['image_shape'])
  model_config, model = steps.make_model(config, info['num_classes'], image_shape[:2])
  tx = optim.make_optimizer(config)
  manager = make_manager(workdir, config, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {workdir}/{CHECKPOINT_DIR}.')
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    init = steps.make_init_fn(model, tx, image_shape)
    abstract = abstract_like(jax.eval_shape(init, jax.random.PRNGKey(0)), sharding)
    state = restore_checkpoint(manager, abstract, step)
  finally:
    manager.close()
  return TrainedModel(
    config=config,
    model_config=model_config,
    model=model,
    params=jax.device_get(state.params),
    class_names=info['class_names'],
    image_shape=image_shape,
    step=step,
  )
