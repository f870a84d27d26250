"""Tests of the model registry, the modules, their parameter layout and numerics.

Big models are only traced (jax.eval_shape); forward passes use tiny models.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mixer_vit import models
from mixer_vit.models import common
from mixer_vit.models import params_io
from mixer_vit.models import precision
from mixer_vit.models import resnet
from mixer_vit.models import vit

ORIGINAL_NAMES = [
  'ViT-Ti_16',
  'ViT-S_16',
  'ViT-B_16',
  'ViT-L_16',
  'ViT-H_14',
  'ViT-B_8',
  'ViT-S_32',
  'ViT-B_32',
  'ViT-L_32',
  'ViT-S_16-gap-norep',
  'ViT-S_32-gap-norep',
  'ViT-B_16-gap-norep',
  'ViT-B_32-gap-norep',
  'R+ViT-Ti_16',
  'R26+ViT-S_32',
  'R26+ViT-B_32',
  'R50+ViT-B_16',
  'R50+ViT-L_32',
  'Mixer-S_16',
  'Mixer-S_32',
  'Mixer-B_16',
  'Mixer-B_32',
  'Mixer-L_16',
  'Mixer-L_32',
  'Mixer-H_14',
  'testing',
  'testing-mixer',
]


@functools.cache
def _abstract_cached(name, batch, image_size, overrides):
  return _abstract_uncached(name, batch, image_size, **dict(overrides))


def _abstract(name, batch=1, image_size=None, **overrides):
  """(param shapes, logits shape) of a model, traced only (and cached)."""
  return _abstract_cached(name, batch, image_size, tuple(sorted(overrides.items())))


def _abstract_uncached(name, batch, image_size, **overrides):
  config = models.get_model_config(name, **overrides)
  model = models.build_model(config)
  size = tuple(image_size or config.image_size)

  def run():
    x = jnp.zeros((batch, *size, 3))
    params = model.init({'params': jax.random.key(0)}, x)['params']
    return params, model.apply({'params': params}, x)

  return jax.eval_shape(run)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_params(model, *args, seed=0):
  """Random parameters of the model's shapes, without running its init.

  (Eager flax init compiles every initializer separately, which is slow on
  CPU; the values only need to be generic here.)
  """
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, *args)['params'])
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    values = rng.normal(size=s.shape)
    values = 1.0 + 0.1 * values if name == 'scale' else 0.3 * values
    return jnp.asarray(values, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _jitted_apply(module, intermediates, static):
  def apply(params, arrays, rng):
    rngs = {} if rng is None else {'dropout': rng}
    if intermediates:
      return models.apply_with_intermediates(module, params, *arrays, rngs=rngs, **dict(static))
    return module.apply({'params': params}, *arrays, rngs=rngs, **dict(static))

  return jax.jit(apply)


def _run(module, params, *arrays, rng=None, intermediates=False, **static):
  """module.apply (or models.apply_with_intermediates), jitted: one compile is cheaper than
  eager op-by-op."""
  return _jitted_apply(module, intermediates, tuple(sorted(static.items())))(params, arrays, rng)


def _init(name, x, seed=0, **overrides):
  model = models.get_model(name, **overrides)
  return model, _random_params(model, x, seed=seed)


# --------------------------------------------------------------------------
# Registry.


def test_registry_has_every_original_name():
  assert set(ORIGINAL_NAMES) <= set(models.list_models())


@pytest.mark.parametrize('name', ORIGINAL_NAMES)
def test_every_model_builds_with_the_right_shapes_and_size(name):
  """Output shape, token grid and exact parameter count of every name."""
  config = models.get_model_config(name, num_classes=1000)
  params, logits = _abstract(name, num_classes=1000)
  assert logits.shape == (1, 1000)
  assert logits.dtype == jnp.float32
  count = _count(params)
  formula = (_mixer_count if config.family == 'mixer' else _vit_count)(config, 1000)
  assert count == formula
  if name in KNOWN_COUNTS:
    assert count == KNOWN_COUNTS[name]
  assert config.image_size == ((32, 32) if name.startswith('testing') else (224, 224))
  h, w = models.token_grid(config)
  if config.family == 'vit':
    tokens = params['Transformer']['posembed_input']['pos_embedding'].shape[1]
    assert tokens == h * w + (config.classifier == 'token')
  else:
    assert params['MixerBlock_0']['token_mixing']['Dense_0']['kernel'].shape[0] == h * w


@pytest.mark.parametrize(
  'alias,name',
  [
    ('Ti_16', 'ViT-Ti_16'),
    ('S_32', 'ViT-S_32'),
    ('B_16', 'ViT-B_16'),
    ('B_8', 'ViT-B_8'),
    ('L_16', 'ViT-L_16'),
    ('R_Ti_16', 'R+ViT-Ti_16'),
    ('R26_S_32', 'R26+ViT-S_32'),
    ('R26_B_32', 'R26+ViT-B_32'),
    ('R50_L_32', 'R50+ViT-L_32'),
    ('S_16-gap-norep', 'ViT-S_16-gap-norep'),
  ],
)
def test_augreg_short_names_resolve(alias, name):
  assert models.resolve_name(alias) == name
  assert models.get_model_config(alias).to_dict() == (models.get_model_config(name).to_dict())


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match='Known models: .*ViT-B_16.*Mixer-B_16'):
    models.get_model_config('ViT-Q_16')


def test_overrides_dotted_nested_and_unknown():
  a = models.get_model_config('ViT-B_16', **{'transformer.num_layers': 2})
  b = models.get_model_config('ViT-B_16', transformer={'num_layers': 2})
  assert a.transformer.num_layers == b.transformer.num_layers == 2
  assert a.transformer.num_heads == 12
  c = models.get_model_config('ViT-B_16', image_size=384, dtype=jnp.bfloat16, **{'patches.size': 8})
  assert c.image_size == (384, 384) and c.patches.size == (8, 8)
  assert c.dtype == 'bfloat16'
  # The original kept dropout under `transformer.`; both spellings work.
  d = models.get_model_config('ViT-B_16', **{'transformer.dropout_rate': 0.2})
  assert d.dropout_rate == 0.2
  with pytest.raises(ValueError, match="Unknown config key 'transformer.foo'"):
    models.get_model_config('ViT-B_16', **{'transformer.foo': 1})
  with pytest.raises(ValueError, match="Unknown config key 'tokens_mlp_dim'"):
    models.get_model_config('ViT-B_16', tokens_mlp_dim=3)
  with pytest.raises(ValueError, match='classifier'):
    models.get_model_config('ViT-B_16', classifier='avg')
  with pytest.raises(ValueError, match='divisible'):
    models.get_model_config('ViT-B_16', hidden_size=100)


def test_original_settings_per_name():
  """Sizes and defaults as in vit_jax/configs/models.py and the Mixer paper."""
  for name in models.list_models():
    config = models.get_model_config(name)
    if config.family == 'vit':
      # No released config has a representation layer by default.
      assert config.representation_size is None, name
      assert config.classifier == ('gap' if 'gap' in name else 'token'), name
  dropout = {
    n: models.get_model_config(n).dropout_rate
    for n in (
      'ViT-B_16',
      'ViT-L_16',
      'ViT-L_32',
      'ViT-H_14',
      'R50+ViT-B_16',
      'R50+ViT-L_32',
      'R26+ViT-B_32',
    )
  }
  assert dropout == {
    'ViT-B_16': 0.0,
    'ViT-L_16': 0.1,
    'ViT-L_32': 0.0,
    'ViT-H_14': 0.1,
    'R50+ViT-B_16': 0.1,
    'R50+ViT-L_32': 0.1,
    'R26+ViT-B_32': 0.0,
  }
  assert tuple(models.get_model_config('R50+ViT-B_16').resnet.num_layers) == (3, 4, 9)
  assert tuple(models.get_model_config('R+ViT-Ti_16').patches.size) == (8, 8)
  s32 = models.get_model_config('Mixer-S_32')
  assert (s32.hidden_size, s32.num_blocks, s32.tokens_mlp_dim, s32.channels_mlp_dim) == (
    512,
    8,
    256,
    2048,
  )


def test_modules_take_the_config_keys():
  """build_model passes the config through: the modules' fields are its keys."""
  config = models.get_model_config('testing', resnet={'num_layers': (1,)}, patches={'size': 1})
  model = models.build_model(config)
  for key, value in config.items():
    if key in ('name', 'family', 'image_size'):
      continue
    field = getattr(model, key)
    if isinstance(value, ml_collections.ConfigDict):
      assert dict(field) == value.to_dict(), key
    else:
      assert field == value, key
  direct = vit.VisionTransformer(
    num_classes=10,
    patches={'size': (4, 4)},
    hidden_size=32,
    transformer={'num_layers': 2, 'mlp_dim': 64, 'num_heads': 2},
  )
  assert direct == models.get_model('testing')
  assert hash(direct) == hash(models.get_model('testing'))
  mixer = models.get_model('testing-mixer')
  assert mixer == models.MlpMixer(
    num_classes=10,
    patches={'size': (4, 4)},
    hidden_size=32,
    num_blocks=2,
    tokens_mlp_dim=32,
    channels_mlp_dim=64,
  )


@pytest.mark.parametrize('name', ['testing', 'testing-mixer'])
def test_intermediates_are_sown_only_when_asked(name):
  x = _images((1, 32, 32, 3))
  model = models.get_model(name)
  variables = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x))
  assert set(variables) == {'params'}  # init sows nothing
  logits = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert logits.shape == (1, 10)  # plain apply: logits only


# --------------------------------------------------------------------------
# Parameter counts.


def _vit_count(c, num_classes):
  """Independent parameter count of a ViT / hybrid config."""
  d, mlp = c.hidden_size, c.transformer.mlp_dim
  h, w = models.token_grid(c)
  in_ch = 3
  n = 0
  if c.resnet is not None:
    width = int(64 * c.resnet.width_factor)
    k = 3 if c.resnet.get('root') == 'conv3' else 7
    n += k * k * 3 * width + 2 * width
    in_ch = width
    for i, units in enumerate(c.resnet.num_layers):
      f = width * 2**i
      for u in range(units):
        if u == 0:  # projection (channel count or stride changes)
          n += in_ch * 4 * f + 2 * 4 * f
        n += in_ch * f + 2 * f + 9 * f * f + 2 * f + f * 4 * f + 2 * 4 * f
        in_ch = 4 * f
  ph, pw = c.patches.size
  n += ph * pw * in_ch * d + d
  tokens = h * w + (c.classifier == 'token')
  n += d * (c.classifier == 'token') + tokens * d
  per_layer = 4 * d + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
  n += c.transformer.num_layers * per_layer + 2 * d
  return n + d * num_classes + num_classes


def _mixer_count(c, num_classes):
  d, t = c.hidden_size, c.tokens_mlp_dim
  h, w = models.token_grid(c)
  s = h * w
  p = c.patches.size[0] * c.patches.size[1] * 3
  per_block = (
    4 * d
    + (s * t + t + t * s + s)
    + (d * c.channels_mlp_dim + c.channels_mlp_dim + c.channels_mlp_dim * d + d)
  )
  return p * d + d + c.num_blocks * per_block + 2 * d + d * num_classes + (num_classes)


# Published sizes at 224px with 1000 classes (timm model cards / papers).
KNOWN_COUNTS = {
  'ViT-Ti_16': 5_717_416,
  'ViT-S_16': 22_050_664,
  'ViT-B_16': 86_567_656,
  'ViT-L_16': 304_326_632,
  'ViT-H_14': 632_045_800,
  'Mixer-B_16': 59_880_472,
  'Mixer-L_16': 208_196_168,
}


# --------------------------------------------------------------------------
# Parameter layout of the released checkpoints.

B16_LAYER = {
  'LayerNorm_0/scale': (768,),
  'LayerNorm_0/bias': (768,),
  'MultiHeadDotProductAttention_1/query/kernel': (768, 12, 64),
  'MultiHeadDotProductAttention_1/query/bias': (12, 64),
  'MultiHeadDotProductAttention_1/key/kernel': (768, 12, 64),
  'MultiHeadDotProductAttention_1/key/bias': (12, 64),
  'MultiHeadDotProductAttention_1/value/kernel': (768, 12, 64),
  'MultiHeadDotProductAttention_1/value/bias': (12, 64),
  'MultiHeadDotProductAttention_1/out/kernel': (12, 64, 768),
  'MultiHeadDotProductAttention_1/out/bias': (768,),
  'LayerNorm_2/scale': (768,),
  'LayerNorm_2/bias': (768,),
  'MlpBlock_3/Dense_0/kernel': (768, 3072),
  'MlpBlock_3/Dense_0/bias': (3072,),
  'MlpBlock_3/Dense_1/kernel': (3072, 768),
  'MlpBlock_3/Dense_1/bias': (768,),
}


def _flat_shapes(name, **overrides):
  params, _ = _abstract(name, batch=1, **overrides)
  return {k: tuple(v.shape) for k, v in params_io.flatten(params).items()}


def test_vit_b16_keys_are_those_of_the_released_file():
  expected = {
    'embedding/kernel': (16, 16, 3, 768),
    'embedding/bias': (768,),
    'cls': (1, 1, 768),
    'Transformer/posembed_input/pos_embedding': (1, 197, 768),
    'Transformer/encoder_norm/scale': (768,),
    'Transformer/encoder_norm/bias': (768,),
    'head/kernel': (768, 1000),
    'head/bias': (1000,),
  }
  for i in range(12):
    expected.update({f'Transformer/encoderblock_{i}/{k}': v for k, v in B16_LAYER.items()})
  assert _flat_shapes('ViT-B_16', num_classes=1000) == expected
  # The i21k files also hold pre_logits (768 -> 768).
  shapes = _flat_shapes('ViT-B_16', num_classes=21843, representation_size=768)
  assert shapes['pre_logits/kernel'] == (768, 768)
  assert shapes['head/kernel'] == (768, 21843)


def test_mixer_b16_keys_are_those_of_the_released_file():
  shapes = _flat_shapes('Mixer-B_16', num_classes=1000)
  expected_some = {
    'stem/kernel': (16, 16, 3, 768),
    'stem/bias': (768,),
    'MixerBlock_0/LayerNorm_0/scale': (768,),
    'MixerBlock_0/token_mixing/Dense_0/kernel': (196, 384),
    'MixerBlock_0/token_mixing/Dense_0/bias': (384,),
    'MixerBlock_0/token_mixing/Dense_1/kernel': (384, 196),
    'MixerBlock_0/token_mixing/Dense_1/bias': (196,),
    'MixerBlock_11/LayerNorm_1/bias': (768,),
    'MixerBlock_11/channel_mixing/Dense_0/kernel': (768, 3072),
    'MixerBlock_11/channel_mixing/Dense_1/kernel': (3072, 768),
    'pre_head_layer_norm/scale': (768,),
    'head/kernel': (768, 1000),
  }
  assert {k: shapes[k] for k in expected_some} == expected_some
  assert len(shapes) == 2 + 12 * 12 + 2 + 2
  assert not any(k.startswith('MixerBlock_12') for k in shapes)


def test_r50_vit_b16_keys_are_those_of_the_released_file():
  shapes = _flat_shapes('R50+ViT-B_16', num_classes=1000)
  expected_some = {
    'conv_root/kernel': (7, 7, 3, 64),
    'gn_root/scale': (64,),
    'gn_root/bias': (64,),
    'block1/unit1/conv_proj/kernel': (1, 1, 64, 256),
    'block1/unit1/gn_proj/scale': (256,),
    'block1/unit1/conv1/kernel': (1, 1, 64, 64),
    'block1/unit1/gn1/scale': (64,),
    'block1/unit1/conv2/kernel': (3, 3, 64, 64),
    'block1/unit1/conv3/kernel': (1, 1, 64, 256),
    'block1/unit1/gn3/bias': (256,),
    'block1/unit3/conv1/kernel': (1, 1, 256, 64),
    'block2/unit1/conv_proj/kernel': (1, 1, 256, 512),
    'block3/unit9/conv3/kernel': (1, 1, 256, 1024),
    'embedding/kernel': (1, 1, 1024, 768),
    'Transformer/posembed_input/pos_embedding': (1, 197, 768),
    'Transformer/encoderblock_11/MlpBlock_3/Dense_1/kernel': (3072, 768),
  }
  assert {k: shapes[k] for k in expected_some} == expected_some
  assert 'block1/unit2/conv_proj/kernel' not in shapes
  assert 'block4/unit1/conv1/kernel' not in shapes
  assert not any(k.endswith('conv1/bias') for k in shapes)  # bias-free convs


def test_scan_stacks_the_per_layer_layout():
  unrolled = _flat_shapes('ViT-B_16')
  stacked = _flat_shapes('ViT-B_16', scan=True)
  assert stacked['Transformer/encoderblock/MultiHeadDotProductAttention_1/query/kernel'] == (
    12,
    768,
    12,
    64,
  )
  params, _ = _abstract('ViT-B_16', batch=1, scan=True)
  # Unstacking the abstract tree is not possible; compare key sets instead.
  per_layer = {
    k.replace('encoderblock/', f'encoderblock_{i}/')
    for k in stacked
    for i in range(12)
    if 'encoderblock/' in k
  }
  others = {k for k in stacked if 'encoderblock/' not in k}
  assert per_layer | others == set(unrolled)
  del params


# --------------------------------------------------------------------------
# Numerics.


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _patchify(x, kernel, bias):
  b, h, w, c = x.shape
  ph, pw = kernel.shape[:2]
  x = x[:, : h // ph * ph, : w // pw * pw]
  x = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // ph) * (w // pw), -1) @ kernel.reshape(-1, kernel.shape[-1]) + bias


def _mlp(x, p):
  return (
    _gelu_tanh(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias']) @ (p['Dense_1']['kernel'])
    + p['Dense_1']['bias']
  )


def _attention(x, p):
  """softmax(q k^T / sqrt(head_dim)) v with explicit einsums."""
  q, k, v = (
    np.einsum('btd,dhk->bthk', x, p[n]['kernel']) + p[n]['bias'] for n in ('query', 'key', 'value')
  )
  w = _softmax(np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1]))
  o = np.einsum('bhqs,bshk->bqhk', w, v)
  return np.einsum('bqhk,hkd->bqd', o, p['out']['kernel']) + p['out']['bias'], w


def _reference_vit(p, x):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = _patchify(np.asarray(x, np.float64), p['embedding']['kernel'], p['embedding']['bias'])
  x = np.concatenate([np.broadcast_to(p['cls'], (x.shape[0], 1, x.shape[2])), x], 1)
  t = p['Transformer']
  x = x + t['posembed_input']['pos_embedding']
  weights = []
  for i in range(len([k for k in t if k.startswith('encoderblock_')])):
    b = t[f'encoderblock_{i}']
    y, w = _attention(_layer_norm(x, b['LayerNorm_0']), b['MultiHeadDotProductAttention_1'])
    weights.append(w)
    x = x + y
    x = x + _mlp(_layer_norm(x, b['LayerNorm_2']), b['MlpBlock_3'])
  x = _layer_norm(x, t['encoder_norm'])
  return x[:, 0] @ p['head']['kernel'] + p['head']['bias'], np.stack(weights)


def _reference_mixer(p, x):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = _patchify(np.asarray(x, np.float64), p['stem']['kernel'], p['stem']['bias'])
  for i in range(len([k for k in p if k.startswith('MixerBlock_')])):
    b = p[f'MixerBlock_{i}']
    y = _layer_norm(x, b['LayerNorm_0']).transpose(0, 2, 1)
    x = x + _mlp(y, b['token_mixing']).transpose(0, 2, 1)
    x = x + _mlp(_layer_norm(x, b['LayerNorm_1']), b['channel_mixing'])
  x = _layer_norm(x, p['pre_head_layer_norm']).mean(1)
  return x @ p['head']['kernel'] + p['head']['bias']


def _images(shape=(2, 32, 32, 3), seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)


def test_vit_forward_matches_an_independent_reference():
  x = _images((2, 32, 48, 3))  # non-square on purpose
  model, params = _init('testing', x)
  logits, inter = _run(model, params, x, intermediates=True)
  want, want_weights = _reference_vit(params, x)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(inter['attention'], want_weights, atol=1e-5)
  # The fused (dot_product_attention) path gives the same logits.
  np.testing.assert_allclose(_run(model, params, x), logits, atol=1e-5)
  # Intermediates: 2 layers, 1 + 8 x 12 tokens, width 32, 2 heads.
  assert inter['blocks'].shape == (2, 2, 97, 32)
  assert inter['attention'].shape == (2, 2, 2, 97, 97)
  assert inter['encoded'].shape == (2, 97, 32)
  np.testing.assert_allclose(inter['pre_logits'], inter['encoded'][:, 0])


def test_mixer_forward_matches_an_independent_reference():
  x = _images()
  model, params = _init('testing-mixer', x)
  logits, inter = _run(model, params, x, intermediates=True)
  np.testing.assert_allclose(logits, _reference_mixer(params, x), rtol=1e-4, atol=1e-4)
  assert inter['blocks'].shape == (2, 2, 64, 32)
  assert inter['pre_logits'].shape == (2, 32)
  assert 'attention' not in inter


def test_attention_matches_flax_multi_head_attention():
  """Same parameter layout and numerics as flax's MHA (used by the original)."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 16))
  params = _random_params(vit.MultiHeadDotProductAttention(num_heads=4), x)
  reference = nn.MultiHeadDotProductAttention(num_heads=4)
  ref_shapes = jax.eval_shape(lambda: reference.init(jax.random.key(1), x, x)['params'])
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_shapes)
  want = _run(reference, params, x, x)
  for impl in ('xla', 'explicit'):
    got, _ = _run(vit.MultiHeadDotProductAttention(num_heads=4, implementation=impl), params, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
  _, weights = _run(vit.MultiHeadDotProductAttention(num_heads=4, return_weights=True), params, x)
  assert weights.shape == (2, 4, 7, 7)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def _reference_block(x, b, eps):
  y, _ = _attention(_layer_norm(x, b['LayerNorm_0'], eps), b['MultiHeadDotProductAttention_1'])
  x = x + y
  return x + _mlp(_layer_norm(x, b['LayerNorm_2'], eps), b['MlpBlock_3'])


def test_block_layer_norm_epsilon_and_gelu():
  """Inputs with variance ~1e-6 make the LayerNorm epsilon (1e-6) visible."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 1e-3
  block = vit.EncoderBlock(mlp_dim=32, num_heads=2)
  params = _random_params(block, x, 0.0)
  got, _ = _run(block, params, x, 0.0)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(got, _reference_block(x64, p64, 1e-6), rtol=1e-4, atol=1e-5)
  assert not np.allclose(got, _reference_block(x64, p64, 1e-5), rtol=1e-3)
  mlp = common.MlpBlock(4)
  h = np.linspace(-3, 3, 8).reshape(1, 8).astype(np.float32)
  identity = {
    'Dense_0': {'kernel': np.eye(8, 4), 'bias': np.zeros(4)},
    'Dense_1': {'kernel': np.eye(4, 8), 'bias': np.zeros(8)},
  }
  out = np.asarray(_run(mlp, identity, h))[0, :4]
  np.testing.assert_allclose(
    out, _gelu_tanh(h[0, :4].astype(np.float64)), atol=1e-6
  )  # tanh form, not erf


def test_weight_standardised_conv():
  x = _images((1, 9, 9, 4))
  conv = resnet.StdConv(8, (3, 3), (2, 2))
  p = _random_params(conv, x)
  k = np.asarray(p['kernel'], np.float64)
  k = (k - k.mean((0, 1, 2))) / (k.std((0, 1, 2)) + 1e-5)
  want = jax.lax.conv_general_dilated(
    x, jnp.asarray(k, jnp.float32), (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  np.testing.assert_allclose(_run(conv, p, x), want, atol=1e-5)


# --------------------------------------------------------------------------
# Options.


@pytest.mark.parametrize('name', ['testing', 'testing-mixer'])
def test_scan_and_unrolled_agree(name):
  x = _images()
  model, params = _init(name, x)
  scanned = models.get_model(name, scan=True, remat=True)
  stacked = params_io.stack_layers(params)
  a, ia = _run(model, params, x, intermediates=True)
  b, ib = _run(scanned, stacked, x, intermediates=True)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert ia.keys() == ib.keys()
  for key in ia:
    assert ia[key].shape == ib[key].shape, key
    np.testing.assert_allclose(ia[key], ib[key], rtol=1e-5, atol=1e-5, err_msg=key)
  if name != 'testing-mixer':
    return  # Gradients once (compiling them is the slow part).
  grad = lambda m, p: jax.jit(
    jax.grad(  # noqa: E731
      lambda p: jnp.sum(m.apply({'params': p}, x) ** 2)
    )
  )(p)
  ga = grad(model, params)
  gb = params_io.unstack_layers(grad(scanned, stacked))
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ga))
  for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(u, v, atol=1e-5 * scale)


@pytest.mark.parametrize(
  'classifier,shape',
  [
    ('token', (2, 10)),
    ('gap', (2, 10)),
    ('map', (2, 10)),
    ('unpooled', (2, 48, 10)),
    ('token_unpooled', (2, 49, 10)),
  ],
)
def test_classifiers(classifier, shape):
  params, logits = _abstract(
    'testing', batch=2, image_size=(24, 32), classifier=classifier
  )  # 6 x 8 patches
  assert logits.shape == shape
  assert ('cls' in params) == (classifier in ('token', 'token_unpooled'))
  assert ('MAPHead_0' in params) == (classifier == 'map')
  tokens = params['Transformer']['posembed_input']['pos_embedding'].shape[1]
  assert tokens == 48 + ('cls' in params)


def test_map_head_and_representation_layer_run():
  x = _images((2, 24, 32, 3))
  model, params = _init('testing', x, classifier='map', representation_size=16)
  assert params['MAPHead_0']['probe'].shape == (1, 1, 32)
  assert params['pre_logits']['kernel'].shape == (32, 16)
  logits, inter = _run(model, params, x, intermediates=True)
  assert logits.shape == (2, 10)
  assert inter['pre_logits'].shape == (2, 16)
  assert np.all(np.abs(inter['pre_logits']) <= 1.0)  # tanh
  assert not np.allclose(inter['pre_logits'][0], inter['pre_logits'][1])


def test_bfloat16_compute_and_params():
  params, logits = _abstract('testing', dtype='bfloat16', param_dtype='bfloat16')
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params))
  assert logits.dtype == jnp.float32
  x = _images()
  mixed, p32 = _init('testing', x, dtype='bfloat16')
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p32))
  full = _run(models.get_model('testing'), p32, x)
  half, inter = _run(mixed, p32, x, intermediates=True)
  assert half.dtype == jnp.float32 and inter['blocks'].dtype == jnp.bfloat16
  np.testing.assert_allclose(half, full, atol=0.05 * float(np.abs(full).max()))


def test_initialisation():
  """Zero head and class token, BERT-style position embeddings, Xavier."""
  model = models.get_model('testing', num_classes=10, hidden_size=64, **{'patches.size': 2})
  x = jnp.zeros((1, 32, 32, 3))
  params = jax.jit(lambda: model.init({'params': jax.random.key(0)}, x))()['params']
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)
  np.testing.assert_array_equal(params['head']['bias'], 0.0)
  np.testing.assert_array_equal(params['cls'], 0.0)
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert abs(float(posemb.std()) - 0.02) < 0.001
  block = params['Transformer']['encoderblock_0']
  query = block['MultiHeadDotProductAttention_1']['query']['kernel']
  # Xavier-uniform over (D, D): bound sqrt(6 / (64 + 64)).
  assert float(jnp.abs(query).max()) <= math.sqrt(6 / 128)
  assert float(jnp.abs(query).max()) > 0.9 * math.sqrt(6 / 128)
  assert float(jnp.abs(block['MlpBlock_3']['Dense_0']['bias']).max()) < 1e-5


@pytest.mark.parametrize(
  'name,overrides',
  [
    ('testing', {'attention_dropout_rate': 0.5}),
    ('testing', {'stochastic_depth': 0.5}),
    ('testing-mixer', {'dropout_rate': 0.1, 'stochastic_depth': 0.5}),
  ],
)
def test_dropout_and_stochastic_depth_act_in_training(name, overrides):
  x = _images((8, 32, 32, 3))
  model, params = _init(name, x, **overrides)
  run = lambda seed: _run(  # noqa: E731
    model, params, x, train=True, rng=jax.random.key(seed)
  )
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0), run(0))


def test_drop_path_rates_rise_linearly():
  np.testing.assert_allclose(common.drop_path_rates(0.2, 5), [0.0, 0.05, 0.1, 0.15, 0.2])


def test_drop_path_keeps_the_expectation():
  class Probe(nn.Module):
    @nn.compact
    def __call__(self, y):
      return common.drop_path(self, y, 0.25, deterministic=False)

  y = jnp.ones((20000, 1, 1))
  out = Probe().apply({}, y, rngs={'dropout': jax.random.key(0)})
  values = np.unique(np.asarray(out))
  np.testing.assert_allclose(values, [0.0, 4 / 3], rtol=1e-6)
  assert abs(float(out.mean()) - 1.0) < 0.03


def test_tiny_hybrid_forward_and_token_grid():
  resnet_cfg = {'num_layers': (1, 1), 'width_factor': 0.5}
  x = _images((1, 40, 56, 3))
  model, params = _init('testing', x, resnet=resnet_cfg, patches={'size': 1})
  assert params['block2']['unit1']['conv_proj']['kernel'].shape == (1, 1, 128, 256)
  assert params['gn_root']['scale'].shape == (32,)
  logits, inter = _run(model, params, x, intermediates=True)
  assert logits.shape == (1, 10)
  config = models.get_model_config('testing', resnet=resnet_cfg, patches={'size': 1})
  h, w = models.token_grid(config, (40, 56))
  assert inter['encoded'].shape[1] == 1 + h * w == 1 + 5 * 7
  assert models.pixels_per_token(config) == (8, 8)


def test_hybrid_conv3_root_keeps_small_images_resolution():
  resnet_cfg = {'num_layers': (1, 1), 'width_factor': 0.5, 'root': 'conv3'}
  x = _images((2, 12, 20, 3))
  model, params = _init('testing', x, resnet=resnet_cfg, patches={'size': 2})
  assert params['conv_root']['kernel'].shape == (3, 3, 3, 32)
  config = models.get_model_config('testing', resnet=resnet_cfg, patches={'size': 2})
  # Only the second stage halves: 12x20 -> 6x10, then 2x2 patches -> 3x5 tokens.
  assert models.token_grid(config, (12, 20)) == (3, 5)
  assert models.pixels_per_token(config) == (4, 4)
  logits, inter = _run(model, params, x, intermediates=True)
  assert logits.shape == (2, 10)
  assert inter['encoded'].shape[1] == 1 + 3 * 5
  sized = models.get_model_config(
    'testing', resnet=resnet_cfg, patches={'size': 2}, image_size=(12, 20)
  )
  assert _vit_count(sized, 10) == sum(p.size for p in jax.tree.leaves(params))


@pytest.mark.parametrize(
  'root,num_layers,size,stride',
  [('conv7_pool', (2, 2), 4, 8), ('conv3_pool', (1, 1), 8, 4), ('conv3', (1, 1, 1), 8, 4)],
)
def test_hybrid_roots_downsampling(root, num_layers, size, stride):
  """The model's token count is what `token_grid` / `pixels_per_token` compute for each root."""
  resnet_cfg = {'num_layers': num_layers, 'width_factor': 0.5, 'root': root}
  x = _images((1, 32, 32, 3))
  model, params = _init('testing', x, resnet=resnet_cfg, patches={'size': 1}, classifier='gap')
  _, inter = _run(model, params, x, intermediates=True)
  assert inter['encoded'].shape[1] == size * size
  config = models.get_model_config('testing', resnet=resnet_cfg, patches={'size': 1})
  assert models.token_grid(config, (32, 32)) == (size, size)
  assert models.pixels_per_token(config) == (stride, stride)


def test_hybrid_num_groups_changes_normalisation_not_parameters():
  """`resnet.num_groups` keeps the parameter tree (released files still load) but not the outputs."""
  x = _images((2, 16, 16, 3))
  base = {'num_layers': (1,), 'width_factor': 0.5, 'root': 'conv3_pool'}
  model32, params = _init('testing', x, resnet=base, patches={'size': 2})
  model8, params8 = _init('testing', x, resnet={**base, 'num_groups': 8}, patches={'size': 2})
  default, _ = _init('testing', x, resnet={**base, 'num_groups': 32}, patches={'size': 2})
  shapes = lambda p: jax.tree.map(jnp.shape, p)  # noqa: E731
  assert shapes(params8) == shapes(params)
  logits32 = _run(model32, params, x)
  np.testing.assert_array_equal(_run(default, params, x), logits32)
  assert not np.allclose(_run(model8, params, x), logits32, atol=1e-3)
  assert models.get_model_config('testing', resnet=base).resnet.num_groups == 32


def test_hybrid_num_groups_must_divide_the_root_width():
  x = _images((1, 16, 16, 3))
  with pytest.raises(ValueError, match=r'resnet.num_groups=12 must divide the root width 32'):
    _init('testing', x, resnet={'num_layers': (1,), 'width_factor': 0.5, 'num_groups': 12})


def test_hybrid_unknown_root_names_the_choices():
  x = _images((1, 16, 16, 3))
  with pytest.raises(ValueError, match="root 'conv5'.*conv3"):
    _init('testing', x, resnet={'num_layers': (1,), 'width_factor': 0.5, 'root': 'conv5'})


@pytest.mark.parametrize(
  'name,size',
  [
    ('R50+ViT-B_16', (384, 256)),
    ('R26+ViT-S_32', (100, 131)),
    ('R+ViT-Ti_16', (224, 224)),
    ('ViT-B_16', (384, 200)),
    ('Mixer-B_16', (100, 70)),
  ],
)
def test_token_grid_matches_the_model(name, size):
  config = models.get_model_config(name)
  params, _ = _abstract(name, batch=1, image_size=size)
  h, w = models.token_grid(config, size)
  if config.family == 'mixer':
    count = params['MixerBlock_0']['token_mixing']['Dense_0']['kernel'].shape[0]
  else:
    count = params['Transformer']['posembed_input']['pos_embedding'].shape[1] - 1
  assert count == h * w


def test_wrong_resolution_error_points_to_load_pretrained():
  model, params = _init('testing', _images())
  with pytest.raises(ValueError, match='load_pretrained'):
    _run(model, params, _images((1, 48, 48, 3)))


def test_attention_scale_is_one_over_sqrt_head_dim():
  q = jnp.ones((1, 1, 1, 16))
  k = jnp.concatenate([jnp.ones((1, 1, 1, 16)), jnp.zeros((1, 1, 1, 16))], 1)
  v = jnp.arange(2.0).reshape(1, 2, 1, 1) * jnp.ones((1, 2, 1, 16))
  out = vit._fused_attention(q, k, v, 'xla')
  p1 = 1 / (1 + math.exp(-16 / 4))  # logits 16/sqrt(16) and 0
  np.testing.assert_allclose(out[0, 0, 0, 0], p1 * 0 + (1 - p1) * 1, atol=1e-6)


def test_auto_attention_is_the_backend_choice():
  assert vit.resolve_attention_impl('xla', jnp.float32) == 'xla'
  expected = {'cpu': 'explicit', 'tpu': 'xla'}.get(jax.default_backend())
  if expected:
    assert vit.resolve_attention_impl('auto', jnp.float32) == expected
  images = _images()
  model, params = _init('testing', images)
  out_auto = _run(model, params, images)
  explicit = model.clone(attention_impl='explicit' if expected == 'explicit' else 'xla')
  np.testing.assert_array_equal(out_auto, _run(explicit, params, images))


def test_attention_softmax_equals_jax_and_differentiates_the_same():
  """`vit.softmax` gives jax.nn.softmax's numbers; its gradient rule is the textbook one."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 7)) * 4
  np.testing.assert_array_equal(vit.softmax(logits), jax.nn.softmax(logits, axis=-1))
  weights = jax.random.normal(jax.random.PRNGKey(1), logits.shape)
  grad = lambda fn: jax.grad(lambda x: jnp.sum(fn(x) * weights))(logits)  # noqa: E731
  np.testing.assert_allclose(
    grad(vit.softmax), grad(lambda x: jax.nn.softmax(x, axis=-1)), rtol=1e-5, atol=1e-6
  )


def test_mlp_gelu_equals_flax_and_differentiates_the_same():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 9)) * 3
  np.testing.assert_array_equal(common.gelu(x), nn.gelu(x, approximate=True))
  grad = lambda fn: jax.grad(lambda v: jnp.sum(jnp.sin(fn(v))))(x)  # noqa: E731
  np.testing.assert_allclose(
    grad(common.gelu), grad(functools.partial(nn.gelu, approximate=True)), rtol=1e-6
  )


# --------------------------------------------------------------------------
# Attention padded for cuDNN: the same numbers as unpadded, and 'auto' never picks what raises.

# (model, resolution): ViT-B/16 and ViT-B/32 at 224, ViT-B/16 at 384 (fine-tuning), ViT-H/14
# (16x16 grid), two hybrids and AugReg's ViT-B/8 and R26+ViT-S/32 at 384.
_SEQUENCE_MODELS = (
  ('ViT-B_16', 224),
  ('ViT-B_32', 224),
  ('ViT-B_16', 384),
  ('ViT-H_14', 224),
  ('R50+ViT-B_16', 224),
  ('R26+ViT-S_32', 384),
  ('ViT-B_8', 224),
)


def _sequence_lengths():
  """(Tq, Tk, head_dim) of every model above (class token included), a 'gap' model's grid, and a
  MAP head's single query over that grid."""
  shapes = []
  for name, resolution in _SEQUENCE_MODELS:
    config = models.get_model_config(name, image_size=(resolution, resolution))
    rows, cols = models.token_grid(config)
    heads = config.transformer.num_heads
    shapes.append((rows * cols + 1, rows * cols + 1, config.hidden_size // heads))
  shapes += [(196, 196, 64), (1, 196, 64)]
  return shapes


def test_sequence_lengths_cover_vit_hybrid_and_augreg_token_counts():
  lengths = {tq for tq, _, _ in _sequence_lengths()}
  assert {197, 50, 577, 257, 145, 785, 196, 1} <= lengths
  assert all(t % vit.CUDNN_SEQ_MULTIPLE for t in (197, 50, 577, 257, 145, 785))


def _qkv(tq, tk, head_dim, dtype, heads=2, batch=2, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, tq, heads, head_dim)).astype(dtype)
  k = jax.random.normal(keys[1], (batch, tk, heads, head_dim)).astype(dtype)
  v = jax.random.normal(keys[2], (batch, tk, heads, head_dim)).astype(dtype)
  cotangent = jax.random.normal(keys[3], (batch, tq, heads, head_dim))
  return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

  out = fn(q, k, v)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *grads)]


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('tq,tk,head_dim', _sequence_lengths())
def test_padded_attention_equals_unpadded_with_gradients(tq, tk, head_dim, dtype):
  """The 'cudnn' path's padding and lengths, run by XLA: output and q/k/v gradients as unpadded."""
  q, k, v, cotangent = _qkv(tq, tk, head_dim, jnp.dtype(dtype), seed=tq)
  padded = jax.jit(lambda q, k, v: vit.padded_attention(q, k, v, 'xla'))
  plain = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='xla'))
  got = _value_and_grads(padded, q, k, v, cotangent)
  want = _value_and_grads(plain, q, k, v, cotangent)
  assert got[0].shape == (2, tq, 2, head_dim)
  for name, a, b in zip(('output', 'dq', 'dk', 'dv'), got, want):
    if dtype == 'float32':
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6, err_msg=name)
    else:  # Within bfloat16's rounding (8 significant bits) of the unpadded result.
      np.testing.assert_allclose(a, b, atol=2**-8, rtol=2**-7, err_msg=name)


def test_padded_attention_pads_to_the_multiple_and_masks_the_padding(monkeypatch):
  """What reaches the kernel: both sequences padded to a multiple of 16, the true lengths given;
  a huge value in the padding changes nothing (the padded keys are masked, not just zero)."""
  seen = []
  real = jax.nn.dot_product_attention

  def spy(q, k, v, **kwargs):
    seen.append((q.shape, k.shape, kwargs))
    return real(q, k, v, **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
  q, k, v, _ = _qkv(197, 197, 64, jnp.bfloat16)
  out = vit.padded_attention(q, k, v, 'xla')
  ((q_shape, k_shape, kwargs),) = seen
  assert q_shape[1] == k_shape[1] == 208 and out.shape == q.shape
  assert kwargs['implementation'] == 'xla'
  np.testing.assert_array_equal(kwargs['query_seq_lengths'], [197, 197])
  np.testing.assert_array_equal(kwargs['key_value_seq_lengths'], [197, 197])
  seen.clear()
  vit.padded_attention(q[:, :16], k[:, :16], v[:, :16], 'xla')  # A multiple: no padding.
  assert seen[0][0][1] == 16 and 'key_value_seq_lengths' not in seen[0][2]
  monkeypatch.setattr(jax.nn, 'dot_product_attention', real)
  # Poison the padding itself: the masked keys still get weight 0.
  poisoned = jnp.pad(v, ((0, 0), (0, 11), (0, 0), (0, 0)), constant_values=1e4)
  big_k = jnp.pad(k, ((0, 0), (0, 11), (0, 0), (0, 0)), constant_values=30.0)
  masked = real(
    vit._pad_tokens(q, 208),
    big_k,
    poisoned,
    query_seq_lengths=jnp.full((2,), 197, jnp.int32),
    key_value_seq_lengths=jnp.full((2,), 197, jnp.int32),
    implementation='xla',
  )[:, :197]
  np.testing.assert_array_equal(masked, out)


@pytest.mark.parametrize('classifier', ['token', 'map'])
@pytest.mark.parametrize('mixed', [False, True])
def test_vit_cudnn_path_padded_equals_xla_with_gradients(monkeypatch, classifier, mixed):
  """A whole ViT (and a MAP head) through the 'cudnn' path, its kernel XLA: the logits and every
  parameter gradient of the unpadded model, in float32 and mixed precision."""
  monkeypatch.setattr(vit, '_CUDNN_KERNEL', 'xla')
  images = _images((2, 20, 20, 3))  # 5x5 patches of 4: 26 tokens, padded to 32.
  overrides = {'classifier': classifier, 'matmul_dtype': 'bfloat16' if mixed else None}
  model, params = _init('testing', images, **overrides)
  labels = jax.nn.one_hot(jnp.arange(2), model.num_classes)

  def loss_and_grads(module):
    def loss(p):
      logits = module.apply({'params': p}, images, train=False)
      return jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, -1)), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, want_logits), want = loss_and_grads(model.clone(attention_impl='xla'))
  (_, got_logits), got = loss_and_grads(model.clone(attention_impl='cudnn'))
  # Through two blocks, the head and the backward pass, float32 rounding of sums in another
  # order: 1e-5 (a key left unmasked moves them by about 1e-1).
  tol = 1e-5 if not mixed else 1e-3
  np.testing.assert_allclose(got_logits, want_logits, atol=tol, rtol=tol)
  for (path, a), b in zip(params_io.flatten(got).items(), params_io.flatten(want).values()):
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol, err_msg=path)


@pytest.mark.parametrize('platform', ['cpu', 'tpu', 'cuda', 'rocm'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])
@pytest.mark.parametrize('head_dim', [4, 64, 80, 88, 104, 128, 160, 256, 264])
def test_auto_attention_never_resolves_to_a_path_that_raises(platform, dtype, head_dim):
  """Per platform x dtype x head size (and so every token count: the cuDNN path pads): 'auto' is
  'explicit' on CPU, 'cudnn' only where cuDNN's checks pass for the padded shapes, else 'xla'."""
  for head_dim_max in (128, 256):  # Before Hopper, from Hopper on.
    impl = vit.resolve_attention_impl('auto', dtype, head_dim, platform, head_dim_max)
    assert impl in ('explicit', 'xla', 'cudnn')
    if platform == 'cpu':
      assert impl == 'explicit'
    elif impl == 'cudnn':
      assert platform == 'cuda' and dtype != 'float32'
      assert head_dim % 8 == 0 and head_dim <= head_dim_max
      for tq, tk in ((197, 197), (50, 50), (577, 577), (257, 257), (1, 196), (145, 145)):
        padded = [-(-t // vit.CUDNN_SEQ_MULTIPLE) * vit.CUDNN_SEQ_MULTIPLE for t in (tq, tk)]
        assert all(p % 2 == 0 and p % 8 == 0 for p in padded)  # Every check jax has carried.
    else:
      assert impl == 'xla'
      # GPU half precision that cuDNN takes always gets cuDNN: the fastest measured.
      assert not (
        platform == 'cuda'
        and dtype != 'float32'
        and vit.cudnn_accepts(head_dim, dtype, head_dim_max)
      )
  assert vit.resolve_attention_impl('xla', dtype, head_dim, platform) == 'xla'
  assert vit.resolve_attention_impl('cudnn', dtype, head_dim, platform) == 'cudnn'


_ON_CUDA = jax.default_backend() == 'gpu' and precision.accelerator_platform() == 'cuda'


@pytest.mark.skipif(not _ON_CUDA, reason='cuDNN flash attention needs a CUDA GPU')
@pytest.mark.parametrize('tq,tk,head_dim', _sequence_lengths())
def test_cudnn_padded_attention_matches_xla_on_a_gpu(tq, tk, head_dim):
  """On a CUDA GPU: cuDNN on the padded sequences gives XLA's unpadded attention and gradients
  within bfloat16 rounding, and really runs cuDNN (its fused kernel is in the compiled step)."""
  if not vit.cudnn_accepts(head_dim, jnp.bfloat16, vit.cudnn_head_dim_max()):
    pytest.skip(f'head dim {head_dim} is not one cuDNN takes on this GPU')
  q, k, v, cotangent = _qkv(tq, tk, head_dim, jnp.bfloat16, heads=4, batch=4, seed=tq)
  padded = jax.jit(lambda q, k, v: vit.padded_attention(q, k, v, 'cudnn'))
  plain = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='xla'))
  assert 'cudnn' in padded.lower(q, k, v).compile().as_text().lower()
  got = _value_and_grads(padded, q, k, v, cotangent)
  want = _value_and_grads(plain, q, k, v, cotangent)
  for name, a, b in zip(('output', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(a, b, atol=2**-6, rtol=2**-6, err_msg=name)


@pytest.mark.skipif(not _ON_CUDA, reason='cuDNN flash attention needs a CUDA GPU')
def test_auto_attention_runs_cudnn_for_a_bfloat16_vit_on_a_gpu():
  images = _images((4, 32, 32, 3))  # 64 patches + the class token: 65 tokens, padded to 80.
  model, params = _init('testing', images, dtype='bfloat16')
  head_dim = model.hidden_size // model.transformer['num_heads']
  assert vit.resolve_attention_impl('auto', jnp.bfloat16, head_dim) == 'cudnn'
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  assert 'cudnn' in forward.lower(params, images).compile().as_text().lower()
  want = _run(model.clone(attention_impl='xla'), params, images)
  np.testing.assert_allclose(forward(params, images), want, atol=5e-2, rtol=5e-2)
