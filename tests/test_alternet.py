"""The ResNet and AlterNet families: documented parameter names, settings refused, training."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_train import losses
from test_train import tiny_config

from mixer_vit import models
from mixer_vit import workdir as workdir_lib
from mixer_vit.models import alternet
from mixer_vit.models import params_io
from mixer_vit.training import config_utils
from mixer_vit.training import train

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs')


def _shapes(name, size=(32, 32), **overrides):
  config = models.get_model_config(name, **overrides)
  model = models.build_model(config)
  params = jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, *size, 3)))['params']
  )
  return config, {k: v.shape for k, v in params_io.flatten(params).items()}


def test_resnet_has_the_released_stem_names_and_a_head():
  config, shapes = _shapes('ResNet-S')
  assert config.family == 'resnet' and tuple(config.resnet.num_layers) == (2, 2, 2)
  # Root 32 wide (64 x 0.5), bottlenecks 32 / 64 / 128 wide, stage outputs 4x that.
  assert shapes['conv_root/kernel'] == (3, 3, 3, 32)
  assert shapes['gn_root/scale'] == (32,)
  assert shapes['block1/unit1/conv1/kernel'] == (1, 1, 32, 32)
  assert shapes['block1/unit1/conv_proj/kernel'] == (1, 1, 32, 128)
  assert shapes['block3/unit2/conv2/kernel'] == (3, 3, 128, 128)
  assert shapes['block3/unit2/gn3/bias'] == (512,)
  assert shapes['head/kernel'] == (512, 10)
  assert 'block1/unit2/conv_proj/kernel' not in shapes  # Only the first unit projects.
  assert {k.split('/')[0] for k in shapes} == {'conv_root', 'gn_root', 'block1', 'block2',
                                               'block3', 'head'}  # fmt: skip
  # The hybrid's stem is the same module: its names load into the ResNet by name.
  _, hybrid = _shapes(
    'testing',
    resnet={'num_layers': (2, 2, 2), 'width_factor': 0.5, 'root': 'conv3_pool', 'num_groups': 8},
  )
  stem = {k: v for k, v in shapes.items() if not k.startswith('head/')}
  assert all(hybrid[k] == v for k, v in stem.items())


def test_alternet_puts_an_msa_unit_last_in_each_late_stage():
  config, shapes = _shapes('AlterNet-S')
  assert config.family == 'alternet' and tuple(config.msa_stages) == (2, 3)
  attention = 'MultiHeadDotProductAttention'
  for stage, width in ((2, 64), (3, 128)):
    unit = f'block{stage}/unit2'
    heads = width // config.msa_head_dim
    assert shapes[f'{unit}/conv1/kernel'] == (1, 1, 4 * width, width)
    assert shapes[f'{unit}/{attention}/query/kernel'] == (width, heads, 32)
    assert shapes[f'{unit}/{attention}/out/kernel'] == (heads, 32, width)
    assert shapes[f'{unit}/conv3/kernel'] == (1, 1, width, 4 * width)
    assert f'{unit}/conv2/kernel' not in shapes  # The 3x3 convolution is replaced.
  assert shapes['block1/unit2/conv2/kernel'] == (3, 3, 32, 32)  # Stage 1 stays convolutional.
  _, resnet_shapes = _shapes('ResNet-S')
  conv_units = {k: v for k, v in resnet_shapes.items() if '/unit2/' not in k or 'block1' in k}
  assert all(shapes[k] == v for k, v in conv_units.items())


@pytest.mark.parametrize('name', ['testing-resnet', 'testing-alternet'])
def test_any_resolution_gives_logits(name):
  config = models.get_model_config(name)
  model = models.build_model(config)
  params = model.init({'params': jax.random.key(0)}, jnp.zeros((1, 8, 8, 3)))['params']
  for size in ((8, 8), (12, 16)):
    images = jax.random.uniform(jax.random.key(1), (2, *size, 3), minval=-1, maxval=1)
    logits = model.apply({'params': params}, images)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  # The head starts at zero, so the logits do too; the features reaching it do not.
  _, out = models.apply_with_intermediates(model, params, images)
  assert np.all(np.asarray(logits) == 0) and float(jnp.std(out['pre_logits'])) > 0


def test_bad_settings_are_refused_naming_the_key():
  with pytest.raises(ValueError, match='msa_stages=.*stage 1 has 1 unit'):
    models.get_model_config('testing-alternet', msa_stages=(1,))
  with pytest.raises(ValueError, match='msa_stages=.*stage 4 does not exist'):
    models.get_model_config('AlterNet-S', msa_stages=(4,))
  with pytest.raises(ValueError, match='scan=True.*model.scan'):
    models.get_model_config('ResNet-S', scan=True)
  with pytest.raises(ValueError, match='stochastic_depth'):
    models.get_model_config('AlterNet-S', stochastic_depth=0.1)
  with pytest.raises(ValueError, match="Unknown config key 'hidden_size'"):
    models.get_model_config('ResNet-S', hidden_size=64)
  with pytest.raises(ValueError, match='resnet cannot be None'):
    models.get_model_config('ResNet-S', resnet=None)
  changed = models.get_model_config('ResNet-S', resnet={'num_layers': (1, 1), 'width_factor': 1})
  assert tuple(changed.resnet.num_layers) == (1, 1) and changed.resnet.root == 'conv7_pool'
  assert models.num_layers(models.get_model_config('AlterNet-S')) == 6


@pytest.mark.parametrize('name', ['cifar10_resnet', 'cifar10_alternet'])
def test_cifar10_configs_use_the_hybrid_recipe(name):
  config = config_utils.load_config_module(os.path.join(CONFIG_DIR, f'{name}.py')).get_config()
  hybrid = config_utils.load_config_module(os.path.join(CONFIG_DIR, 'cifar10.py')).get_config()
  assert config.model_name == {'cifar10_resnet': 'ResNet-S', 'cifar10_alternet': 'AlterNet-S'}[name]
  assert config.model.to_dict() == {}
  for key in ('lr', 'total_steps', 'pp_train', 'batch_size', 'weight_decay', 'matmul_dtype'):
    assert config[key] == hybrid[key], key


@pytest.mark.parametrize('name', ['testing-resnet', 'testing-alternet'])
def test_trains_in_the_driver_on_digits(tmp_path, name):
  """A few steps of the real driver on 8 devices: the loss falls, a checkpoint loads back."""
  config = tiny_config(total_steps=30, warmup_steps=3, log_every=1, checkpoint_every=30)
  config.model_name = name
  config.model = ml_collections.ConfigDict()
  config.matmul_dtype = 'bfloat16'  # The mixed-precision paths of both families.
  workdir = str(tmp_path)
  result = train.train_and_evaluate(config, workdir)
  curve = losses(workdir)
  assert np.mean([curve[s] for s in (28, 29, 30)]) < np.mean([curve[s] for s in (1, 2, 3)]) - 0.3
  assert result['test_accuracy'] > 0.3
  trained = workdir_lib.load_workdir(workdir)
  assert trained.model_config.family == name.split('-')[1]


def test_num_heads_never_zero():
  assert alternet.num_heads(16, 32) == 1 and alternet.num_heads(128, 32) == 4
