"""Reading a finished or running training run back: its model, config and parameters."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from mixer_vit.runtime import paths
from mixer_vit.training import optim
from mixer_vit.training import steps
from mixer_vit.workdir import files
from mixer_vit.workdir.checkpoints import abstract_like
from mixer_vit.workdir.checkpoints import make_manager
from mixer_vit.workdir.checkpoints import reason_line
from mixer_vit.workdir.checkpoints import restore_checkpoint
from mixer_vit.workdir.checkpoints import restore_newest
from mixer_vit.workdir.files import CHECKPOINT_DIR
from mixer_vit.workdir.files import CheckpointRestoreError
from mixer_vit.workdir.files import WorkdirError
from mixer_vit.workdir.files import read_config
from mixer_vit.workdir.files import read_dataset_info


@dataclasses.dataclass
class TrainedModel:
  """What ``load_workdir`` returns: enough to run the model on new images."""

  config: ml_collections.ConfigDict  # The training config (data keys give the preprocessing).
  model_config: ml_collections.ConfigDict
  model: Any  # flax module: model.apply({'params': params}, images, train=False).
  params: Any  # Host (numpy) arrays: the parameters, or their EMA (`ema`).
  class_names: list[str] | None
  image_shape: tuple[int, ...]  # (H, W, 3) the model was trained on.
  step: int
  ema: bool = False  # `params` are the EMA parameters of the checkpoint.


def load_workdir(workdir: str, step: int | None = None, ema: bool = False) -> TrainedModel:
  """The model, config and parameters of the latest (or the given) checkpoint in ``workdir``.

  Works while the training still runs (reads the newest finished checkpoint) and on any device
  count; the parameters come back as numpy arrays. With ``ema`` they are the checkpoint's EMA
  parameters (``config.ema_decay``); a WorkdirError says so when it has none.
  """
  config = read_config(workdir)
  info = read_dataset_info(workdir)
  image_shape = tuple(info['image_shape'])
  model_config, model = steps.make_model(config, info['num_classes'], image_shape[:2])
  tx = optim.make_optimizer(config)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  init = steps.make_init_fn(model, tx, image_shape)
  abstract = abstract_like(jax.eval_shape(init, jax.random.PRNGKey(0)), sharding)
  if step is None:  # The newest that restores (a damaged one is reported and left as it is).
    state, step = restore_newest(workdir, config, abstract)
  else:
    if step not in files.checkpoint_steps(workdir):
      raise FileNotFoundError(
        f'no checkpoint of step {step} in {files.checkpoint_dir(workdir)} (steps: '
        f'{files.checkpoint_steps(workdir)}).'
      )
    manager = make_manager(workdir, config, read_only=True)
    try:
      state = restore_checkpoint(manager, abstract, step)
    except Exception as e:  # noqa: BLE001  Whatever is damaged: one message naming the files.
      raise CheckpointRestoreError(
        f'cannot restore {paths.join(files.checkpoint_dir(workdir), str(step))} ({reason_line(e)}).'
      ) from e
    finally:
      manager.close()
  params = state.params
  if ema:
    params = steps.ema_params_of(state)
    if params is None:
      raise WorkdirError(
        f'{workdir}/{CHECKPOINT_DIR}/{step} holds no EMA parameters: the run was trained '
        'without config.ema_decay (train with --config.ema_decay=D to have them); leave out '
        '--ema to use its parameters.'
      )
  return TrainedModel(
    config=config,
    model_config=model_config,
    model=model,
    params=jax.device_get(params),
    class_names=info['class_names'],
    image_shape=image_shape,
    step=step,
    ema=ema,
  )
