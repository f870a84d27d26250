"""Every config file loads for the arguments its docstring documents, with the keys scripts need."""

import math
import pathlib
import re
import subprocess
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from mixer_vit import data
from mixer_vit import models
from mixer_vit.models import precision
from mixer_vit.training import config_utils

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
REQUIRED_KEYS = (
  'total_steps',
  'batch_size',
  'dataset',
  'seed',
  'pretrained',
  'model_name',
  'model',
  'warmup_steps',
  'optimizer',
  'lr',
  'schedule',
  'grad_clip_norm',
  'weight_decay',
  'accum_steps',
  'loss',
  'dtype',
  'log_every',
  'eval_every',
  'checkpoint_every',
  'keep_checkpoints',
  'train_split',
  'test_split',
  'pp_train',
  'pp_test',
  'eval_batch_size',
  'shuffle_buffer',
  'prefetch',
  'skip_corrupt',
  'data_dir',
)


def _load(name: str):
  return config_utils.load_config_module(CONFIG_DIR / f'{name}.py')


def _documented_args():
  """(file, arg) for every `--config=configs/FILE.py[:ARG]` in the config docstrings."""
  found = []
  for path in sorted(CONFIG_DIR.glob('*.py')):
    doc = _load(path.stem).__doc__
    for file, arg in re.findall(r'--config=configs/(\w+)\.py(?::(\S+))?', doc):
      found.append((file, arg or None))
  return found


DOCUMENTED = _documented_args()
AUGREG_LEVELS = ('none', 'light1', 'light2', 'medium1', 'medium2', 'strong1', 'strong2')


def test_every_config_file_documents_a_command():
  files = {f for f, _ in DOCUMENTED}
  assert files == {p.stem for p in CONFIG_DIR.glob('*.py')}, DOCUMENTED


@pytest.mark.parametrize(
  'file,arg',
  DOCUMENTED
  + [
    ('pretrain', 'Mixer-B_16,imagenet2012'),
    ('pretrain', 'ViT-Ti_16,mnist'),
    ('finetune', 'Mixer-B_16,cifar10'),
    ('finetune', 'ViT-B_16,imagenet2012'),
    ('digits', 'vit'),
    ('digits', 'hybrid'),
    ('digits', None),
    ('augreg', None),
  ]
  + [
    ('augreg', f'{model},{level},{dataset}')
    for level in AUGREG_LEVELS
    for model, dataset in (('ViT-S_16', 'imagenet2012'), ('R26+ViT-S_32', 'imagenet21k'))
  ],
)
def test_config_loads_with_required_keys_and_valid_model(file, arg):
  config = _load(file).get_config(arg)
  assert isinstance(config, ml_collections.ConfigDict)
  missing = [k for k in REQUIRED_KEYS if k not in config]
  assert not missing, missing
  assert config.batch_size % config.accum_steps == 0
  assert config.warmup_steps < config.total_steps
  # The model overrides are valid for the registry entry.
  model_config = models.get_model_config(config.model_name, **config.model.to_dict())
  assert model_config.family in models.registry.FAMILIES


def test_recipes_follow_their_sources():
  vit = _load('pretrain').get_config('ViT-B_16,imagenet2012')
  assert (vit.batch_size, vit.lr, vit.warmup_steps, vit.grad_clip_norm) == (4096, 3e-3, 10_000, 1.0)
  assert vit.weight_decay == pytest.approx(9e-4) and vit.model.dropout_rate == 0.1
  assert vit.total_steps == 92_898  # 300 epochs of 99% of 1,281,167 images.
  mixer = _load('pretrain').get_config('Mixer-B_16,imagenet2012')
  assert (mixer.lr, mixer.weight_decay, mixer.schedule, mixer.loss) == (
    1e-3,
    1e-4,
    'linear',
    'sigmoid_xent',
  )
  ft = _load('finetune').get_config('ViT-B_16,cifar10')
  assert (ft.optimizer, ft.momentum, ft.mu_dtype, ft.lr, ft.warmup_steps, ft.batch_size) == (
    'sgd',
    0.9,
    'bfloat16',
    0.03,
    500,
    512,
  )
  assert ft.total_steps == 10_000 and ft.pretrained == 'ViT-B_16.npz'
  assert '384' in ft.pp_train and '384' in ft.pp_test
  assert _load('finetune').get_config('ViT-B_16,imagenet2012').total_steps == 20_000
  assert _load('digits').get_config('mixer').model_name == 'testing-mixer'


def test_augreg_levels_follow_big_vision():
  """big_vision's vit_i1k.py / vit_i21k.py (the paper's code): RandAugment (2, m), mixup alpha."""
  expected = {
    'none': (None, 0.0),
    'light1': (0, 0.0),
    'light2': (10, 0.2),
    'medium1': (15, 0.2),
    'medium2': (15, 0.5),
    'strong1': (20, 0.5),
    'strong2': (20, 0.8),
  }
  assert set(expected) == set(AUGREG_LEVELS)
  for level, (magnitude, alpha) in expected.items():
    c = _load('augreg').get_config(f'ViT-B_16,{level}')
    ops = data.preprocess.parse(c.pp_train)
    data.preprocess.get_preprocess_fn(c.pp_train, num_classes=1000)  # Known ops, valid args.
    names = [name for name, _, _ in ops]
    assert names[:2] == ['decode_jpeg_and_inception_crop', 'flip_lr']
    assert names[-2:] == ['value_range', 'onehot']
    randaug = [(args, kwargs) for name, args, kwargs in ops if name == 'randaug']
    assert randaug == ([] if magnitude is None else [((2, magnitude), {})])
    if magnitude is not None:
      assert names.index('randaug') < names.index('value_range')  # On uint8 images.
    mix = data.DataConfig.from_config(c).mixup
    assert (mix.p, mix.alpha) == (1.0, alpha) if alpha else mix is None
  c = _load('augreg').get_config('ViT-B_16,medium1,imagenet2012')
  assert (c.lr, c.batch_size, c.warmup_steps, c.schedule, c.grad_clip_norm) == (
    1e-3,
    4096,
    10_000,
    'cosine',
    1.0,
  )
  assert c.weight_decay == pytest.approx(1e-4) and c.total_steps == 92_898
  assert (c.model.dropout_rate, c.model.stochastic_depth, c.loss) == (0.0, 0.0, 'softmax_xent')
  c = _load('augreg').get_config('ViT-B_16,light2,imagenet21k,wd=0.03,do=0.1,sd=0.1,epochs=30')
  assert c.weight_decay == pytest.approx(3e-5)
  assert (c.model.dropout_rate, c.model.stochastic_depth) == (0.1, 0.1)
  assert (c.dataset, c.loss, c.model.head_bias_init) == ('imagenet21k', 'sigmoid_xent', -10.0)
  assert 'representation_size' not in c.model
  assert c.total_steps == math.ceil((14_197_122 - 51_200) * 30 / 4096)
  with pytest.raises(ValueError, match='unknown AUG'):
    _load('augreg').get_config('ViT-B_16,medium3')
  with pytest.raises(ValueError, match='no ViT'):
    _load('augreg').get_config('Mixer-B_16,medium1')


def test_bad_config_args_fail_clearly():
  with pytest.raises(ValueError, match='unknown name'):
    _load('pretrain').get_config('ViT-B_16,cifar10,epochs=3')
  with pytest.raises(ValueError, match="'hybrid', 'vit' or 'mixer'"):
    _load('digits').get_config('resnet')
  with pytest.raises(Exception, match='NoSuchModel'):
    _load('finetune').get_config('NoSuchModel,cifar10')


def _parse(*args):
  values = flags.FlagValues()
  argv = ['prog', *args]  # config_flags finds the override flags in argv when defining them.
  config_flags.DEFINE_config_file(
    'config', None, 'config', flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def test_command_line_overrides_and_unknown_keys():
  config = _parse(
    f'--config={CONFIG_DIR}/digits.py:mixer',
    '--config.total_steps=7',
    '--config.pretrained=/tmp/x.npz',
    '--config.model.hidden_size=16',
    '--config.dataset=/data/folder',
    '--config.data_dir=/tmp/tfds',
  )
  assert (config.total_steps, config.pretrained, config.model.hidden_size) == (7, '/tmp/x.npz', 16)
  assert (config.dataset, config.data_dir) == ('/data/folder', '/tmp/tfds')
  with pytest.raises((AttributeError, KeyError), match='no_such_key'):
    _parse(f'--config={CONFIG_DIR}/digits.py', '--config.no_such_key=1')


@pytest.mark.parametrize('platform', ['cpu', 'cuda', 'rocm', 'tpu'])
def test_precision_auto_is_the_fastest_measured_per_backend(platform):
  """GPU / TPU: dtype=bfloat16 (faster than matmul_dtype=bfloat16 for ViT-B/16 on an H200); CPU:
  mixed precision for the half-precision recipes, float32 for the float32 ones."""
  resolve = precision.resolve_precision
  if platform == 'cpu':
    assert resolve('auto', cpu_half=True, platform=platform) == ('float32', 'bfloat16')
    assert resolve('auto', cpu_half=False, platform=platform) == ('float32', None)
  else:
    for cpu_half in (True, False):
      assert resolve('auto', cpu_half, platform) == ('bfloat16', None)
  for cpu_half in (True, False):  # Given explicitly: the same on every backend.
    assert resolve('float32', cpu_half, platform) == ('float32', None)
    assert resolve('bfloat16', cpu_half, platform) == ('bfloat16', None)
    assert resolve('mixed', cpu_half, platform) == ('float32', 'bfloat16')


def test_pretrain_and_augreg_choose_precision_by_backend(monkeypatch):
  pretrain, augreg = _load('pretrain'), _load('augreg')

  def precisions():
    return [
      (c.dtype, c.matmul_dtype)
      for c in (
        pretrain.get_config('ViT-B_16,imagenet2012'),
        pretrain.get_config('Mixer-B_16,imagenet2012'),
        augreg.get_config('ViT-S_16,light1,imagenet21k'),
        pretrain.get_config('ViT-Ti_16,cifar10'),
      )
    ]

  monkeypatch.setattr(precision, 'installed_platform', lambda: 'cpu')
  mixed, f32 = ('float32', 'bfloat16'), ('float32', None)
  assert precisions() == [mixed, mixed, mixed, f32]  # The small data sets as before: float32.
  for platform in ('cuda', 'tpu'):
    monkeypatch.setattr(precision, 'installed_platform', lambda p=platform: p)
    assert precisions() == [('bfloat16', None)] * 4
  # Given explicitly, whatever the backend; the other arguments still work beside it.
  c = augreg.get_config('ViT-B_16,medium1,imagenet2012,wd=0.03,precision=mixed')
  assert (c.dtype, c.matmul_dtype, c.weight_decay) == ('float32', 'bfloat16', pytest.approx(3e-5))
  c = pretrain.get_config('ViT-Ti_16,cifar10,precision=float32')
  assert (c.dtype, c.matmul_dtype) == f32
  with pytest.raises(ValueError, match=r"precision='fp8': use one of \['auto', 'float32'"):
    pretrain.get_config('ViT-B_16,imagenet2012,precision=fp8')
  # The trainer's keys still override the choice.
  config = _parse(
    f'--config={CONFIG_DIR}/pretrain.py:ViT-Ti_16,cifar10,precision=mixed',
    '--config.matmul_dtype=float16',
  )
  assert config.matmul_dtype == 'float16'


def test_precision_auto_starts_no_jax_backend(monkeypatch):
  """A config is read before jax.distributed.initialize (multi-host runs), which must come before
  any backend starts: 'auto' looks at JAX_PLATFORMS and the installed plugins only."""
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu')
  assert precision.installed_platform() == 'tpu'
  monkeypatch.setenv('JAX_PLATFORMS', 'gpu,cpu')
  assert precision.installed_platform() == 'cuda'
  monkeypatch.delenv('JAX_PLATFORMS')
  code = (
    'import importlib.util\n'
    'from jax._src import xla_bridge\n'
    f'spec = importlib.util.spec_from_file_location("p", {str(CONFIG_DIR / "pretrain.py")!r})\n'
    'module = importlib.util.module_from_spec(spec)\n'
    'spec.loader.exec_module(module)\n'
    'config = module.get_config("ViT-B_16,imagenet2012")\n'
    'print(config.dtype, config.matmul_dtype, xla_bridge.backends_are_initialized())\n'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  dtype, matmul_dtype = precision.resolve_precision('auto', cpu_half=True)
  assert out.stdout.split() == [dtype, str(matmul_dtype), 'False']


def test_model_keys_from_the_command_line():
  from mixer_vit import main  # noqa: PLC0415  (defines absl flags: only for this test)

  argv = ['prog', '--config=c.py', '--config.model.remat=True', '--config.model.patches.size']
  rest, overrides = main.take_model_overrides([*argv, '(4, 4)', '--config.lr=0.1'])
  assert rest == ['prog', '--config=c.py', '--config.lr=0.1']
  assert overrides == [('remat', 'True'), ('patches.size', '(4, 4)')]
  config = config_utils.base_config()
  config.model.hidden_size = 64
  config.lock()
  config_utils.set_model_keys(config, [*overrides, ('hidden_size', '32'), ('name', 'x')])
  assert config.model.to_dict() == {
    'hidden_size': 32,
    'remat': True,
    'patches': {'size': (4, 4)},
    'name': 'x',
  }
  with pytest.raises(
    ValueError, match=r"--config.model.hidden_size=wide: 'wide' is not a valid int"
  ):
    config_utils.set_model_keys(config, [('hidden_size', 'wide')])
  with pytest.raises(ValueError, match="'maybe' is not a bool"):
    config_utils.set_model_keys(config, [('remat', 'maybe')])
