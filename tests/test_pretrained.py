"""Tests of adapting checkpoints to models: models.load_pretrained, load_params,
image_size_from_params, and the ViT's position-embedding resize."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from mixer_vit import models
from mixer_vit.models import params_io
from mixer_vit.models import vit

import param_trees


def _logits(config, params, x):
  model = models.build_model(config)
  return jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x)


def _images(size=(32, 32), batch=2):
  return np.random.default_rng(0).uniform(-1, 1, (batch, *size, 3)).astype(np.float32)


# --------------------------------------------------------------------------
# Position embeddings.


def _ramp(rows, cols, extra=1, width=3):
  i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  grid = np.stack([2.0 * i + 0.5 * j + d for d in range(width)], -1)
  extra_tokens = np.full((1, extra, width), 7.0)
  return np.concatenate([extra_tokens, grid.reshape(1, rows * cols, width)], 1).astype(np.float32)


def test_posemb_resize_is_identity_at_the_same_size():
  posemb = np.random.default_rng(0).normal(size=(1, 1 + 12, 4))
  np.testing.assert_array_equal(vit.resize_posemb(posemb, (3, 4), (3, 4), 1), posemb)


@pytest.mark.parametrize(
  'old,new', [((14, 14), (24, 24)), ((14, 14), (24, 16)), ((7, 7), (5, 9)), ((24, 16), (14, 14))]
)
def test_posemb_resize_keeps_a_linear_ramp_linear(old, new):
  out = vit.resize_posemb(_ramp(*old), old, new, 1)
  assert out.shape == (1, 1 + new[0] * new[1], 3)
  np.testing.assert_array_equal(out[:, :1], 7.0)  # class token untouched
  i, j = np.meshgrid(
    np.linspace(0, old[0] - 1, new[0]), np.linspace(0, old[1] - 1, new[1]), indexing='ij'
  )
  want = np.stack([2.0 * i + 0.5 * j + d for d in range(3)], -1)
  np.testing.assert_allclose(out[0, 1:].reshape(*new, 3), want, atol=1e-5)


def test_posemb_resize_matches_scipy_zoom_like_the_original():
  grid = np.random.default_rng(1).normal(size=(14, 14, 5))
  want = scipy.ndimage.zoom(grid, (24 / 14, 24 / 14, 1), order=1)
  got = vit.resize_posemb_grid(grid, (24, 24))
  np.testing.assert_allclose(got, want, atol=1e-10)


# --------------------------------------------------------------------------
# load_pretrained / load_params.


def test_scan_and_unrolled_models_give_the_same_logits_from_one_file(tmp_path):
  for name in ('testing', 'testing-mixer'):
    path = tmp_path / f'{name}.npz'
    params_io.save_npz(param_trees.random_params(models.get_model_config(name)), path)
    x = _images()
    outputs = []
    for scan in (False, True):
      config = models.get_model_config(name, scan=scan)
      params = models.load_params(path, config)
      assert params_io.is_stacked(params) == scan
      outputs.append(_logits(config, params, x))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def _pretrained(tmp_path, **overrides):
  config = models.get_model_config('testing', **overrides)
  params = param_trees.random_params(config, seed=1)
  path = tmp_path / 'pretrained.npz'
  params_io.save_npz(params, path)
  return path, params


def test_load_pretrained_replaces_head_and_drops_pre_logits(tmp_path):
  path, pretrained = _pretrained(tmp_path, representation_size=32, num_classes=21)
  config = models.get_model_config('testing', num_classes=5)
  init = param_trees.random_params(config, seed=2)
  params = models.load_pretrained(path, init, config)
  assert 'pre_logits' not in params
  param_trees.assert_trees_equal(params['head'], init['head'])
  param_trees.assert_trees_equal(params['Transformer'], pretrained['Transformer'])
  param_trees.assert_trees_equal(params['embedding'], pretrained['embedding'])
  # Same representation size: pre_logits kept; a new one is fresh.
  config = models.get_model_config('testing', representation_size=32)
  init = param_trees.random_params(config, seed=2)
  params = models.load_pretrained(pretrained, init, config)
  param_trees.assert_trees_equal(params['pre_logits'], pretrained['pre_logits'])
  config = models.get_model_config('testing', representation_size=8)
  init = param_trees.random_params(config, seed=2)
  params = models.load_pretrained(pretrained, init, config)
  param_trees.assert_trees_equal(params['pre_logits'], init['pre_logits'])
  # A new attention-pooling head starts from its initialisation too.
  gap = models.get_model_config('testing', classifier='gap')
  config = models.get_model_config('testing', classifier='map')
  init = param_trees.random_params(config, seed=2)
  params = models.load_pretrained(param_trees.random_params(gap), init, config)
  param_trees.assert_trees_equal(params['MAPHead_0'], init['MAPHead_0'])


def test_load_pretrained_resizes_posemb_for_a_non_square_resolution(tmp_path):
  path, pretrained = _pretrained(tmp_path)  # 32 x 32 -> 8 x 8 grid
  config = models.get_model_config(
    'testing', image_size=(48, 32), scan=True, param_dtype='bfloat16', num_classes=3
  )
  init = param_trees.random_params(config)
  params = models.load_pretrained(path, init, config)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params))
  old = pretrained['Transformer']['posembed_input']['pos_embedding']
  new = params['Transformer']['posembed_input']['pos_embedding']
  assert new.shape == (1, 1 + 12 * 8, 32)
  np.testing.assert_allclose(np.float32(new[:, 0]), old[:, 0], rtol=1e-2)
  want = vit.resize_posemb(old, (8, 8), (12, 8), 1)
  np.testing.assert_allclose(np.float32(new), want, rtol=1e-2, atol=1e-2)
  np.testing.assert_array_equal(
    params['Transformer']['encoderblock']['LayerNorm_0']['bias'][1],
    pretrained['Transformer']['encoderblock_1']['LayerNorm_0']['bias'].astype(jnp.bfloat16),
  )
  logits = _logits(config, params, _images((48, 32)))
  assert logits.shape == (2, 3)
  assert models.image_size_from_params(params, config) == (48, 32)
  # {'params': ...} in, {'params': ...} out.
  wrapped = models.load_pretrained(path, {'params': init}, config)
  assert set(wrapped) == {'params'}


def test_load_pretrained_errors_name_the_offending_keys(tmp_path):
  _, pretrained = _pretrained(tmp_path)
  config = models.get_model_config('testing')
  init = param_trees.random_params(config)
  broken = params_io.unflatten(params_io.flatten(pretrained))
  del broken['Transformer']['encoderblock_1']['LayerNorm_2']['scale']
  broken['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel'] = np.zeros(
    (32, 65), np.float32
  )
  broken['extra_layer'] = {'kernel': np.zeros(3)}
  with pytest.raises(ValueError) as error:
    models.load_pretrained(broken, init, config)
  message = str(error.value)
  assert 'Missing keys (1)' in message
  assert 'Transformer/encoderblock_1/LayerNorm_2/scale' in message
  assert 'Unexpected keys (1)' in message and 'extra_layer/kernel' in message
  assert 'Shape mismatches (1)' in message
  assert (
    'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel: checkpoint (32, 65) vs model (32, 64)'
  ) in message
  with pytest.raises(ValueError, match='Missing keys'):
    deeper = models.get_model_config('testing', **{'transformer.num_layers': 3})
    models.load_pretrained(pretrained, param_trees.random_params(deeper), deeper)
  mixer = models.get_model_config('testing-mixer', image_size=48)
  with pytest.raises(ValueError, match='token-mixing'):
    models.load_pretrained(
      param_trees.random_params(models.get_model_config('testing-mixer')),
      param_trees.random_params(mixer),
      mixer,
    )


def test_load_pretrained_fixes_legacy_layouts(tmp_path):
  resnet = {'num_layers': (1,), 'width_factor': 0.5}
  config = models.get_model_config('testing', resnet=resnet, patches={'size': 1})
  params = param_trees.random_params(config)
  legacy = params_io.unflatten(
    {
      k: (v.reshape(1, 1, 1, -1) if '/gn' in '/' + k and k.endswith(('scale', 'bias')) else v)
      for k, v in params_io.flatten(params).items()
    }
  )
  assert legacy['gn_root']['scale'].shape == (1, 1, 1, 32)
  assert legacy['block1']['unit1']['gn_proj']['bias'].shape == (1, 1, 1, 128)
  # Linen renumbering of the block's submodules (vit_jax after
  # convert_pre_linen).
  linen_names = {
    'LayerNorm_2': 'LayerNorm_1',
    'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
    'MlpBlock_3': 'MlpBlock_0',
  }
  for block in ('encoderblock_0', 'encoderblock_1'):
    legacy['Transformer'][block] = {
      linen_names.get(k, k): v for k, v in legacy['Transformer'][block].items()
    }
  params_io.save_npz(legacy, tmp_path / 'legacy.npz')
  restored = models.load_pretrained(tmp_path / 'legacy.npz', params, config)
  param_trees.assert_trees_equal(restored, params)
  param_trees.assert_trees_equal(models.load_params(tmp_path / 'legacy.npz', config), params)


def test_load_params_errors_say_which_setting_to_change(tmp_path):
  path, _ = _pretrained(tmp_path, representation_size=16, num_classes=21)
  with pytest.raises(ValueError, match='set num_classes'):
    models.load_params(path, models.get_model_config('testing', representation_size=16))
  with pytest.raises(ValueError, match='set representation_size'):
    models.load_params(path, models.get_model_config('testing', num_classes=21))
  params = models.load_params(
    path, models.get_model_config('testing', num_classes=21, representation_size=16)
  )
  assert params['head']['kernel'].shape == (16, 21)


# --------------------------------------------------------------------------
# image_size_from_params.


def _abstract_params(name, image_size=None, **overrides):
  config = models.get_model_config(name, **overrides)
  model = models.build_model(config)
  size = tuple(image_size or config.image_size)
  return jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, *size, 3)))['params']
  )


@pytest.mark.parametrize(
  'name,trained_at,config_size,want',
  [
    ('ViT-B_16', (224, 224), 224, (224, 224)),
    ('ViT-B_16', (384, 384), 224, (384, 384)),
    ('ViT-B_16', (384, 256), (384, 256), (384, 256)),
    ('ViT-B_16', (384, 256), 224, None),  # 24 x 16 is not square: unknown
    ('ViT-S_16-gap-norep', (224, 224), 224, (224, 224)),
    ('R50+ViT-B_16', (384, 384), 224, (384, 384)),
    ('R26+ViT-S_32', (224, 224), 224, (224, 224)),
    ('Mixer-B_16', (224, 224), 224, (224, 224)),
    ('Mixer-B_32', (384, 384), 224, (384, 384)),
  ],
)
def test_image_size_from_params(name, trained_at, config_size, want):
  params = _abstract_params(name, image_size=trained_at)
  config = models.get_model_config(name, image_size=config_size)
  assert models.image_size_from_params(params, config) == want
  stacked = _abstract_params(name, image_size=trained_at, scan=True)
  assert models.image_size_from_params(stacked, config) == want


def test_image_size_from_params_without_the_tree():
  config = models.get_model_config('ViT-B_16')
  assert models.image_size_from_params({'head': {}}, config) is None
