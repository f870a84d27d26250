"""Every config file loads for the arguments its docstring documents, with the keys scripts need."""

import math
import pathlib
import re

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from mixer_vit import config_utils
from mixer_vit import data
from mixer_vit import models

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
