"""Parameter-tree helpers shared by the tests of files and model loading."""

import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit import models
from mixer_vit import params_io


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
