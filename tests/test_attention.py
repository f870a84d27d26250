"""Attention rollout and per-head maps: the maths, the grids, the PNGs, the command."""

from __future__ import annotations

import jax
import numpy as np
from PIL import Image
import pytest

from mixer_vit import attention
from mixer_vit import models
from mixer_vit.models import params_io


def _random_attention(rng, layers, batch, heads, tokens):
  logits = rng.normal(size=(layers, batch, heads, tokens, tokens)) * 3
  a = np.exp(logits - logits.max(-1, keepdims=True))
  return a / a.sum(-1, keepdims=True)


def test_rollout_rows_are_distributions():
  rng = np.random.default_rng(0)
  att = _random_attention(rng, layers=4, batch=2, heads=3, tokens=1 + 6)
  joint = attention.rollout(att)
  assert joint.shape == (2, 7, 7)
  assert np.all(joint >= 0)
  np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-9)


def test_rollout_matches_the_definition_by_hand():
  rng = np.random.default_rng(1)
  att = _random_attention(rng, layers=3, batch=1, heads=2, tokens=5)
  eye = np.eye(5)
  per_layer = [(a.mean(0) + eye) / (a.mean(0) + eye).sum(-1, keepdims=True) for a in att[:, 0]]
  expected = per_layer[2] @ per_layer[1] @ per_layer[0]
  np.testing.assert_allclose(attention.rollout(att)[0], expected, rtol=1e-10)


def test_rollout_of_uniform_attention_is_uniform_off_the_residual():
  # One layer, uniform attention: (U + I) / 2 -> row i is 1/(2T) everywhere plus 1/2 at i.
  t = 4
  att = np.full((1, 1, 2, t, t), 1.0 / t)
  joint = attention.rollout(att)[0]
  np.testing.assert_allclose(joint, np.full((t, t), 0.5 / t) + 0.5 * np.eye(t))


def test_token_map_reads_the_class_row_and_gap_the_row_mean():
  grid = (2, 3)
  rng = np.random.default_rng(2)
  m = rng.random((1 + 6, 1 + 6))
  cls_map = attention.token_map(m, grid, 'token')
  expected = m[0, 1:] / m[0, 1:].sum()
  np.testing.assert_allclose(cls_map, expected.reshape(grid))
  g = rng.random((6, 6))
  gap_map = attention.token_map(g, grid, 'gap')
  expected = g.mean(0) / g.mean(0).sum()
  np.testing.assert_allclose(gap_map, expected.reshape(grid))


@pytest.mark.parametrize('classifier', ['token', 'gap'])
@pytest.mark.parametrize('grid', [(3, 5), (4, 2), (1, 1)])
def test_map_shapes_follow_the_patch_grid(classifier, grid):
  rng = np.random.default_rng(3)
  tokens = grid[0] * grid[1] + (1 if classifier == 'token' else 0)
  att = _random_attention(rng, layers=2, batch=3, heads=4, tokens=tokens)
  rolled = attention.rollout_map(att, grid, classifier)
  assert rolled.shape == (3,) + grid
  np.testing.assert_allclose(rolled.sum((-2, -1)), 1.0, atol=1e-9)
  heads = attention.head_maps(att, grid, classifier, layer=-1)
  assert heads.shape == (3, 4) + grid
  np.testing.assert_allclose(heads.sum((-2, -1)), 1.0, atol=1e-6)


def test_patch_grid_from_tokens_and_aspect():
  # 48x80 image, 16x16 patches: 3x5 grid + class token.
  assert attention.patch_grid(1 + 15, (48, 80), 'token') == (3, 5)
  assert attention.patch_grid(15, (80, 48), 'gap') == (5, 3)
  assert attention.patch_grid(1 + 196, (224, 224), 'token') == (14, 14)


def test_patch_grid_from_config_for_plain_and_hybrid():
  plain = models.get_model_config('ViT-B_16')
  assert attention.patch_grid(1 + 2 * 7, (32, 112), 'token', plain) == (2, 7)
  hybrid = models.get_model_config('R50+ViT-B_16')
  # ResNet-50 stem of the hybrids: stride 16 with 'SAME' padding -> ceil(40/16)=3, ceil(72/16)=5.
  assert attention.patch_grid(1 + 15, (40, 72), 'token', hybrid) == (3, 5)


def test_bad_attention_shape_says_what_to_pass():
  with pytest.raises(ValueError, match='apply_with_intermediates'):
    attention.rollout(np.ones((2, 3, 3)))
  with pytest.raises(ValueError, match='out of range'):
    attention.head_maps(np.ones((2, 1, 1, 2, 2)) / 2, (1, 1), 'token', layer=5)


def test_overlay_png_has_the_image_size(tmp_path):
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, size=(60, 100, 3), dtype=np.uint8)
  heat = rng.random((3, 5))
  path = attention.save_overlay_png(str(tmp_path / 'o.png'), image, heat)
  with Image.open(path) as im:
    assert im.format == 'PNG'
    assert im.size == (100, 60)
  # The hottest patch is brightest in the overlay's heat channel.
  out = attention.overlay(np.zeros((60, 100, 3), np.uint8), np.eye(3, 5)[:, :5], alpha=1.0)
  assert out[10, 10].sum() > out[50, 90].sum()


# ----------------------------------------------------------------------------------------------
# With real (tiny) models.


def _tiny_vit(**overrides):
  config = models.get_model_config('testing', **overrides)
  model = models.build_model(config)
  h, w = config.image_size
  params = jax.jit(
    lambda k: model.init({'params': k}, np.zeros((1, h, w, 3), np.float32), train=False)['params']
  )(jax.random.PRNGKey(0))
  return config, model, params


@pytest.mark.parametrize(
  'overrides, image_hw, grid',
  [
    ({}, (32, 32), (8, 8)),
    # Non-square, no class token (the token classifier's non-square case is in the command test).
    ({'image_size': (24, 40), 'classifier': 'gap'}, (24, 40), (6, 10)),
    # Hybrid: ResNet root only (stride 4, 'SAME') then 4x4 patches -> ceil(50/4)//4, ceil(70/4)//4.
    ({'image_size': (50, 70), 'resnet': {'num_layers': (), 'width_factor': 0.5}}, (50, 70), (3, 4)),
  ],
)
def test_maps_from_a_model_follow_its_grid(overrides, image_hw, grid):
  config, model, params = _tiny_vit(**overrides)
  images = np.random.default_rng(0).uniform(-1, 1, size=(2, *image_hw, 3)).astype(np.float32)
  maps = attention.compute(model, params, images, config, layer=0)
  assert maps['rollout'].shape == (2, *grid)
  assert maps['heads'].shape == (2, config.transformer.num_heads, *grid)
  np.testing.assert_allclose(maps['rollout'].sum((-2, -1)), 1.0, atol=1e-5)
  joint = attention.rollout(maps['attention'])
  np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-5)
  assert maps['logits'].shape == (2, config.num_classes)


def test_mixer_has_no_attention_maps():
  config = models.get_model_config('testing-mixer')
  model = models.build_model(config)
  x = np.zeros((1, 32, 32, 3), np.float32)
  params = model.init({'params': jax.random.PRNGKey(0)}, x, train=False)['params']
  with pytest.raises(ValueError, match='no attention'):
    attention.compute(model, params, x, config)


def test_command_writes_pngs_with_the_image_aspect(tmp_path, capsys):
  config, _, params = _tiny_vit(image_size=(24, 40))
  path = str(tmp_path / 'wide.npz')
  params_io.save_npz(params, path)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(tmp_path / 'a.png')
  Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(tmp_path / 'b.jpg')
  (tmp_path / 'c.jpg').write_bytes(b'broken')
  out = tmp_path / 'maps'
  rc = attention.main(
    [
      f'--checkpoint={path}',
      '--model=testing',
      '--resolution=24,40',
      f'--out_dir={out}',
      f'--summary={out / "all.png"}',
      '--min_side=60',
      str(tmp_path / 'a.png'),
      str(tmp_path / 'b.jpg'),
      str(tmp_path / 'c.jpg'),
    ]
  )
  assert rc == 1  # c.jpg is reported, the others are drawn.
  assert 'c.jpg' in capsys.readouterr().err
  with Image.open(out / 'a_rollout.png') as im:
    assert im.format == 'PNG' and im.size == (150, 90)  # The file's own size and aspect.
  with Image.open(out / 'b_rollout.png') as im:
    assert im.size == (60, 90)  # Enlarged to a shorter side of 60, aspect kept.
  for name in ('a_heads.png', 'b_heads.png', 'all.png'):
    with Image.open(out / name) as im:
      assert im.format == 'PNG' and im.size[0] > 100
