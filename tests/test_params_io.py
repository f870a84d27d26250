"""Tests of the .npz parameter files and the tree helpers (mixer_vit.models.params_io)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_vit import models
from mixer_vit.models import params_io

import param_trees

# --------------------------------------------------------------------------
# Files.


def test_round_trip_is_exact(tmp_path):
  config = models.get_model_config('testing')
  params = param_trees.random_params(config)
  path = tmp_path / 'params.npz'
  params_io.save_npz(params, path)
  param_trees.assert_trees_equal(params_io.load_npz(path), params)
  # Also from {'params': ...} and jax arrays, to a str path.
  params_io.save_npz({'params': jax.tree.map(jnp.asarray, params)}, str(tmp_path / 'b.npz'))
  param_trees.assert_trees_equal(params_io.load_npz(tmp_path / 'b.npz'), params)
  assert [p.name for p in tmp_path.iterdir()].count('params.npz') == 1
  assert not list(tmp_path.glob('*.tmp'))


def test_bfloat16_is_stored_as_float32(tmp_path):
  params = {
    'a': {'kernel': jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)},
    'b': np.arange(3, dtype=np.int32),
  }
  params_io.save_npz(params, tmp_path / 'p.npz')
  restored = params_io.load_npz(tmp_path / 'p.npz')
  assert restored['a']['kernel'].dtype == np.float32
  assert restored['b'].dtype == np.int32
  np.testing.assert_array_equal(restored['a']['kernel'], np.arange(6).reshape(2, 3))


def test_file_layout_is_flat_per_layer_and_pickle_free(tmp_path):
  config = models.get_model_config('testing', scan=True)
  stacked = param_trees.random_params(config)
  assert stacked['Transformer']['encoderblock']['LayerNorm_0']['scale'].shape == (2, 32)
  params_io.save_npz(stacked, tmp_path / 'p.npz')
  with np.load(tmp_path / 'p.npz', allow_pickle=False) as npz:
    keys = set(npz.files)
    query = npz['Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel']
  assert query.shape == (32, 2, 16)
  np.testing.assert_array_equal(
    query,
    stacked['Transformer']['encoderblock']['MultiHeadDotProductAttention_1']['query']['kernel'][1],
  )
  assert 'cls' in keys and 'head/kernel' in keys
  assert 'Transformer/posembed_input/pos_embedding' in keys
  assert not any(k.startswith('params/') or 'encoderblock/' in k for k in keys)
  unrolled = param_trees.random_params(models.get_model_config('testing'))
  assert keys == set(params_io.flatten(unrolled))


def test_gfile_paths(tmp_path):
  """Paths with a scheme go through tf.io.gfile (ram:// needs no network)."""
  params = {'x': np.arange(4.0, dtype=np.float32)}
  params_io.save_npz(params, 'ram://mixer_vit_test/p.npz')
  param_trees.assert_trees_equal(params_io.load_npz('ram://mixer_vit_test/p.npz'), params)


def test_missing_file_error():
  with pytest.raises(FileNotFoundError):
    params_io.load_npz('/nonexistent/params.npz')


def test_stack_and_unstack_layers_are_inverse():
  stacked = param_trees.random_params(models.get_model_config('testing-mixer', scan=True))
  assert params_io.is_stacked(stacked)
  unrolled = params_io.unstack_layers(stacked)
  assert not params_io.is_stacked(unrolled)
  assert {'MixerBlock_0', 'MixerBlock_1'} <= set(unrolled) and 'MixerBlock' not in unrolled
  param_trees.assert_trees_equal(params_io.stack_layers(unrolled), stacked)
  del unrolled['MixerBlock_0']
  with pytest.raises(ValueError, match='not numbered 0..0'):
    params_io.stack_layers(unrolled)


def test_verify_tree_lists_what_does_not_fit():
  expected = {'a': {'kernel': np.zeros((2, 3))}, 'b': np.zeros(4)}
  params_io.verify_tree(expected, expected)
  with pytest.raises(ValueError) as error:
    params_io.verify_tree(
      {'a': {'kernel': np.zeros((3, 3))}, 'c': np.zeros(1)},
      expected,
      hints={'b': 'b is needed.', 'z': 'never shown'},
    )
  message = str(error.value)
  assert 'Missing keys (1):\n    b' in message
  assert 'Unexpected keys (1):\n    c' in message
  assert 'a/kernel: checkpoint (3, 3) vs model (2, 3)' in message
  assert 'Hint: b is needed.' in message and 'never shown' not in message
