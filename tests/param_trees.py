"""Parameter-tree helpers shared by the tests of files and model loading."""

import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit import models
from mixer_vit.models import params_io
from mixer_vit.runtime import parallel
from mixer_vit.training import optim


def random_params(config, image_size=None, seed=0):
  """Random params of the model's shapes (eval_shape + numpy: no compiles)."""
  model = models.build_model(config)
  size = tuple(image_size or config.image_size)
  shapes = jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, *size, 3)))['params']
  )
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: np.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def assert_trees_equal(a, b):
  """Same keys, dtypes and values, leaf by leaf."""
  fa, fb = params_io.flatten(a), params_io.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def tiny_vit_training(config):
  """``(model_config, model, schedule, tx, mesh)``: a 1-layer, width-8 ViT on 8x8 images with 3
  classes and ``config``'s optimiser, on one device (no compile)."""
  model_config = models.get_model_config(
    'testing', num_classes=3, image_size=(8, 8), hidden_size=8, **{'transformer.num_layers': 1}
  )
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config, schedule)
  mesh = parallel.make_mesh(jax.devices()[:1])
  return model_config, models.build_model(model_config), schedule, tx, mesh


def train_tiny_digits(workdir):
  """A very short digits run of the tiny model in ``workdir``: ``(workdir, result)`` (its
  checkpoint, config.json, metrics.jsonl and params.npz; 10 classes at 16x16)."""
  from mixer_vit.training import config_utils  # noqa: PLC0415  # Only the tests that train need these.
  from mixer_vit.training import train  # noqa: PLC0415

  config = config_utils.base_config()
  config.dataset = 'digits'
  config.model_name = 'testing'
  config.pp_train = 'decode|resize(16)|value_range(-1,1)|onehot'
  config.pp_test = 'decode|resize(16)|value_range(-1,1)|onehot'
  config.total_steps = 4
  config.warmup_steps = 1
  config.batch_size = 32
  config.eval_batch_size = 64
  config.log_every = 2
  config.eval_every = 4
  config.checkpoint_every = 4
  return str(workdir), train.train_and_evaluate(config, str(workdir))
