"""Named model configurations and the factory that turns them into modules.

The names are those of the released checkpoints (gs://vit_models/...), plus `testing` /
`testing-mixer` (tiny models for tests), and the convolutional families of "How Do Vision
Transformers Work?" for small images: `ResNet-S` (family `resnet`, `models.resnet`) and
`AlterNet-S` (family `alternet`, `models.alternet`), with `testing-resnet` / `testing-alternet`. The sizes, and the per-model default dropout, follow
vit_jax/configs/models.py; the Mixer sizes missing there (S, H) follow Table 1 of the MLP-Mixer
paper. As in the original list, no model has a `representation_size` by default: the
ImageNet-21k ViT checkpoints carry a 768-wide `pre_logits` layer that `models.load_pretrained`
drops (pass representation_size=768 to keep it). The AugReg release's spellings resolve to the
same configs: short names (`B_16`, `R26_S_32`), paper names (`B/16`, `R26+S/32`) and full file
names (`augreg.py`), which also set the file's head and resolution.

A config's keys are the module's fields (plus `name`, `family` and `image_size`), so
`build_model` passes the config through: `patches.size`, `hidden_size`,
`transformer.{num_layers, mlp_dim, num_heads}`,
`resnet.{num_layers, width_factor, root, num_groups}` (ViT); `num_blocks`, `tokens_mlp_dim`,
`channels_mlp_dim` (Mixer); `resnet` (ResNet, AlterNet) and `msa_stages`, `msa_head_dim`
(AlterNet); `dropout_rate`, `stochastic_depth`, `dtype`, `matmul_dtype`, ... (all).
"""

from __future__ import annotations

from collections.abc import Callable
import difflib
from typing import Any

import flax.linen as nn
import ml_collections

from mixer_vit.models import alternet
from mixer_vit.models import augreg
from mixer_vit.models import common
from mixer_vit.models import dvt
from mixer_vit.models import mixer
from mixer_vit.models import precision
from mixer_vit.models import resnet
from mixer_vit.models import vit
from mixer_vit.runtime import sizes

# Model family -> its module file (`Model`, and the checkpoint steps models.load_pretrained uses).
FAMILIES = {'vit': vit, 'mixer': mixer, 'resnet': resnet, 'alternet': alternet, 'dvt': dvt}
# Families whose stages are ViTs: the ViT keys and checks apply.
_VIT_FAMILIES = ('vit', 'dvt')
# Families built of ResNet units: no token layers, so no scan / remat / stochastic depth.
_CONV_FAMILIES = ('resnet', 'alternet')
# Config keys that are no module field.
_NOT_FIELDS = ('name', 'family', 'image_size')

_CONFIGS: dict[str, Callable[[], ml_collections.ConfigDict]] = {}
_ALIASES: dict[str, str] = {}

# vit_jax kept the ViT dropout under `transformer.`; accepted as input, stored at the top level
# (one key for ViT and Mixer).
_KEY_ALIASES = {
  'transformer.dropout_rate': 'dropout_rate',
  'transformer.attention_dropout_rate': 'attention_dropout_rate',
}


def _options(c: ml_collections.ConfigDict, dropout: float) -> None:
  c.num_classes = 1000
  c.image_size = (224, 224)
  c.head_bias_init = 0.0
  c.dropout_rate = dropout
  c.stochastic_depth = 0.0
  c.dtype = 'float32'
  c.param_dtype = 'float32'
  # Mixed precision: 'bfloat16' multiplies in bfloat16, accumulating in float32 (models.precision).
  c.matmul_dtype = ml_collections.FieldReference(None, field_type=str)
  c.remat = False
  c.remat_policy = 'nothing'  # What remat keeps (common.REMAT_POLICIES).
  c.scan = False


def _vit(
  name, patch, hidden, mlp, heads, layers, dropout=0.0, classifier='token', resnet=None
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = name
  c.family = 'vit'
  c.patches = ml_collections.ConfigDict({'size': (patch, patch)})
  c.hidden_size = hidden
  c.transformer = ml_collections.ConfigDict(
    {'num_layers': layers, 'mlp_dim': mlp, 'num_heads': heads}
  )
  c.classifier = classifier
  c.representation_size = None
  c.resnet = None
  if resnet is not None:
    _set_resnet(c, {'num_layers': resnet})
  _options(c, dropout)
  c.attention_dropout_rate = 0.0
  c.attention_impl = 'auto'
  return c


def _mixer(name, patch, hidden, blocks, tokens_mlp, channels_mlp) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = name
  c.family = 'mixer'
  c.patches = ml_collections.ConfigDict({'size': (patch, patch)})
  c.hidden_size = hidden
  c.num_blocks = blocks
  c.tokens_mlp_dim = tokens_mlp
  c.channels_mlp_dim = channels_mlp
  _options(c, 0.0)
  return c


def _convnet(name, family, stages, width, root, groups, msa_stages=()) -> ml_collections.ConfigDict:
  """A ResNet (or, with `msa_stages`, an AlterNet) for 32 px images and 10 classes."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.family = family
  c.resnet = None
  _set_resnet(c, {'num_layers': stages, 'width_factor': width, 'root': root, 'num_groups': groups})
  if family == 'alternet':
    c.msa_stages = tuple(msa_stages)
    c.msa_head_dim = 32
    c.attention_impl = 'auto'
  _options(c, 0.0)
  c.num_classes = 10
  c.image_size = (32, 32)
  return c


def _register(
  name: str, make: Callable[[], ml_collections.ConfigDict], augreg_alias: bool = True
) -> None:
  _CONFIGS[name] = make
  if augreg_alias:
    # AugReg file names: 'ViT-' dropped and '+' spelled '_' ('R26_S_32').
    _ALIASES[name.replace('ViT-', '').replace('+', '_')] = name


# Widths: (hidden, mlp, heads, layers).
_VIT_SIZES = {
  'Ti': (192, 768, 3, 12),
  'S': (384, 1536, 6, 12),
  'B': (768, 3072, 12, 12),
  'L': (1024, 4096, 16, 24),
  'H': (1280, 5120, 16, 32),
  'g': (1408, 6144, 16, 40),  # "Scaling Vision Transformers" (Zhai et al. 2021), Table 2.
}
# Default dropout of the original configs (used when fine-tuning).
_VIT_MODELS = {
  # name: (size, patch, dropout)
  'ViT-Ti_16': ('Ti', 16, 0.0),
  'ViT-S_16': ('S', 16, 0.0),
  'ViT-B_16': ('B', 16, 0.0),
  'ViT-L_16': ('L', 16, 0.1),
  'ViT-H_14': ('H', 14, 0.1),
  'ViT-g_14': ('g', 14, 0.0),  # No released checkpoint: for training (and memory) only.
  'ViT-B_8': ('B', 8, 0.0),
  'ViT-S_32': ('S', 32, 0.0),
  'ViT-B_32': ('B', 32, 0.0),
  'ViT-L_32': ('L', 32, 0.0),
}
_GAP_NOREP = ('ViT-S_16', 'ViT-S_32', 'ViT-B_16', 'ViT-B_32')
# name: (size, patch after the stem, dropout, resnet stages)
_HYBRIDS = {
  'R+ViT-Ti_16': ('Ti', 8, 0.0, ()),
  'R26+ViT-S_32': ('S', 1, 0.0, (2, 2, 2, 2)),
  'R26+ViT-B_32': ('B', 1, 0.0, (2, 2, 2, 2)),
  'R50+ViT-B_16': ('B', 1, 0.1, (3, 4, 9)),
  'R50+ViT-L_32': ('L', 1, 0.1, (3, 4, 6, 3)),
}
# Mixer sizes: (hidden, blocks, tokens_mlp, channels_mlp).
_MIXER_SIZES = {
  'S': (512, 8, 256, 2048),
  'B': (768, 12, 384, 3072),
  'L': (1024, 24, 512, 4096),
  'H': (1280, 32, 640, 5120),
}
_MIXER_MODELS = {
  'Mixer-S_16': ('S', 16),
  'Mixer-S_32': ('S', 32),
  'Mixer-B_16': ('B', 16),
  'Mixer-B_32': ('B', 32),
  'Mixer-L_16': ('L', 16),
  'Mixer-L_32': ('L', 32),
  'Mixer-H_14': ('H', 14),
}


def _dvt(name, patch, hidden, mlp, heads, layers, stage_sizes, reuse_hidden, num_classes):
  """A Dynamic ViT cascade (`models.dvt`) of ViT stages of this size at `stage_sizes`."""
  c = _vit(name, patch, hidden, mlp, heads, layers)
  c.family = 'dvt'
  c.stage_sizes = tuple(stage_sizes)
  c.feature_reuse = True
  c.relation_reuse = True
  c.reuse_hidden = reuse_hidden
  c.num_classes = num_classes
  c.image_size = tuple(stage_sizes[-1])
  return c


# Dynamic ViT cascades: (patch, hidden, mlp, heads, layers, stage sizes, reuse width, classes).
# 'DVT-XS_4': for 28x28 digits, 4-pixel patches at 12, 20 and 28 pixels (3x3, 5x5 then 7x7
# tokens), each stage a ViT of width 64 with 4 layers (configs/mnist_dvt.py).
_DVTS = {
  'testing-dvt': (4, 32, 64, 2, 2, ((8, 8), (16, 16)), 16, 10),
  'DVT-XS_4': (4, 64, 128, 4, 4, ((12, 12), (20, 20), (28, 28)), 32, 10),
}


def _testing() -> ml_collections.ConfigDict:
  c = _vit('testing', 4, 32, 64, 2, 2)
  c.num_classes = 10
  c.image_size = (32, 32)
  return c


def _testing_mixer() -> ml_collections.ConfigDict:
  c = _mixer('testing-mixer', 4, 32, 2, 32, 64)
  c.num_classes = 10
  c.image_size = (32, 32)
  return c


# Small-image convolutional models: (family, stages, width factor, root, GroupNorm groups, MSA
# stages). 'ResNet-S' extends the CIFAR-10 hybrid's stem (configs/cifar10.py: half-width BiT units
# after a 3x3 root + max-pool, 8 groups; stages at 16x16 and 8x8) by a third stage at the 4x4 of
# the hybrid's tokens, two units per stage: BiT's R20 at half width, 0.87 M parameters at 10
# classes. 'AlterNet-S': the same with the last unit of stages 2 and 3 an MSA unit (0.77 M).
_CONVNETS = {
  'testing-resnet': ('resnet', (1, 1), 0.25, 'conv3', 8, ()),
  'testing-alternet': ('alternet', (1, 2), 0.5, 'conv3', 8, (2,)),
  'ResNet-S': ('resnet', (2, 2, 2), 0.5, 'conv3_pool', 8, ()),
  'AlterNet-S': ('alternet', (2, 2, 2), 0.5, 'conv3_pool', 8, (2, 3)),
}


def _populate() -> None:
  _register('testing', _testing, augreg_alias=False)
  _register('testing-mixer', _testing_mixer, augreg_alias=False)
  for name, spec in _CONVNETS.items():
    _register(name, lambda n=name, s=spec: _convnet(n, *s), augreg_alias=False)
  for name, spec in _DVTS.items():
    _register(name, lambda n=name, s=spec: _dvt(n, *s), augreg_alias=False)
  for name, (size, patch, dropout) in _VIT_MODELS.items():
    _register(
      name, lambda n=name, s=size, p=patch, d=dropout: _vit(n, p, *_VIT_SIZES[s], dropout=d)
    )
  for base in _GAP_NOREP:
    size, patch, dropout = _VIT_MODELS[base]
    name = base + '-gap-norep'
    _register(
      name,
      lambda n=name, s=size, p=patch, d=dropout: _vit(
        n, p, *_VIT_SIZES[s], dropout=d, classifier='gap'
      ),
    )
  for name, (size, patch, dropout, stages) in _HYBRIDS.items():
    _register(
      name,
      lambda n=name, s=size, p=patch, d=dropout, r=stages: _vit(
        n, p, *_VIT_SIZES[s], dropout=d, resnet=r
      ),
    )
  for name, (size, patch) in _MIXER_MODELS.items():
    _register(
      name, lambda n=name, s=size, p=patch: _mixer(n, p, *_MIXER_SIZES[s]), augreg_alias=False
    )


_populate()


def list_models(include_aliases: bool = False) -> list[str]:
  """Registered model names (optionally with the AugReg short names)."""
  names = list(_CONFIGS)
  if include_aliases:
    names += [a for a in _ALIASES if a not in _CONFIGS]
  return names


def resolve_name(name: str) -> str:
  """Canonical name for `name`, an AugReg short name ('R26_S_32'), paper name ('R26+S/32') or
  released AugReg file name ('B_16-i21k-300ep-...', see `models.augreg`)."""
  if name in _CONFIGS:
    return name
  if name in _ALIASES:
    return _ALIASES[name]
  paper_names = {paper: model for model, paper in augreg.MODELS.values()}
  if name in paper_names:
    return paper_names[name]
  if augreg.is_file_name(name):
    return augreg.parse(name).model
  raise ValueError(
    f'Unknown model {name!r}. Known models: {", ".join(_CONFIGS)}. '
    f'AugReg short names: {", ".join(_ALIASES)}; AugReg paper names: {", ".join(paper_names)}; '
    'and the released AugReg file names (B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-'
    'sd_0.0[--imagenet2012-steps_20k-lr_0.01-res_384][.npz]).'
  )


def _normalise(key: str, value: Any) -> Any:
  if key in ('image_size', 'patches.size'):
    return sizes.pair(value, key)
  if key in ('dtype', 'param_dtype'):
    return common.to_dtype(value).name
  if key == 'matmul_dtype':
    dtype = precision.to_matmul_dtype(value)
    return None if dtype is None else dtype.name
  if key in ('resnet.num_layers', 'msa_stages'):
    return tuple(value)
  if key == 'stage_sizes':
    return tuple(sizes.pair(size, 'stage_sizes') for size in value)
  return value


def _flatten_overrides(overrides: dict[str, Any], prefix: str = ''):
  for key, value in overrides.items():
    full = prefix + key
    if isinstance(value, (dict, ml_collections.ConfigDict)) and full != 'resnet':
      yield from _flatten_overrides(dict(value), full + '.')
    else:
      yield full, value


def _set_resnet(config: ml_collections.ConfigDict, value: Any) -> None:
  if value is None and config.get('family') in _CONV_FAMILIES:
    raise ValueError(f'{config.name} is a {config.family} model: resnet cannot be None.')
  if value is not None:
    value = dict(value)
    unknown = set(value) - {'num_layers', 'width_factor', 'root', 'num_groups'}
    if unknown or 'num_layers' not in value:
      raise ValueError(
        'resnet must be None or a dict with num_layers (tuple), width_factor (float) and '
        f'optionally root (one of {sorted(resnet.ROOTS)}) and num_groups (int, GroupNorm '
        f'groups, default {resnet.DEFAULT_NUM_GROUPS}), got {value!r}.'
      )
    value = ml_collections.ConfigDict(
      {
        'num_layers': tuple(value['num_layers']),
        'width_factor': float(value.get('width_factor', 1.0)),
        'root': str(value.get('root', resnet.DEFAULT_ROOT)),
        'num_groups': int(value.get('num_groups', resnet.DEFAULT_NUM_GROUPS)),
      }
    )
  with config.unlocked():
    config.resnet = value


def _apply_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  key = _KEY_ALIASES.get(key, key)
  if key == 'resnet' and config.family in (*_VIT_FAMILIES, *_CONV_FAMILIES):
    _set_resnet(config, value)
    return
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      if part == 'resnet' and node is config and config.family in (*_VIT_FAMILIES, *_CONV_FAMILIES):
        raise ValueError(
          f'{config.name} has no ResNet stem; set resnet={{"num_layers": '
          f'(...), "width_factor": 1.0}} as a whole instead of {key!r}.'
        )
      raise ValueError(_unknown_key_message(config, key))
    node = node[part]
  if leaf not in node:
    raise ValueError(_unknown_key_message(config, key))
  value = _normalise(key, value)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f'Bad type for {key}={value!r}: {e}') from e


def _all_keys(config: ml_collections.ConfigDict, prefix: str = ''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _all_keys(value, prefix + key + '.')
    else:
      yield prefix + key


def _unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
  known = sorted(_all_keys(config))
  close = difflib.get_close_matches(key, known, n=1)
  hint = f' Did you mean {close[0]!r}?' if close else ''
  return (
    f'Unknown config key {key!r} for {config.name} ({config.family}).{hint} '
    f'Known keys: {", ".join(known)}.'
  )


def get_model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The config of model `name` with `overrides` applied.

  `name` may be a released AugReg file name (`models.augreg`): its config has the file's head
  (21843 classes for ImageNet-21k pretraining), fine-tuning resolution and dropout 0.

  Overrides are keyed by config key; nested keys either dotted (`**{'transformer.num_layers': 2}`)
  or as nested dicts (`transformer={'num_layers': 2}`). Unknown keys raise a ValueError. The
  result is locked (new keys cannot be added by mistake).
  """
  config = _CONFIGS[resolve_name(name)]()
  config.lock()
  # A released AugReg file name sets its head, resolution and dropout first; `overrides` win.
  if augreg.is_file_name(name):
    for key, value in augreg.config_overrides(augreg.parse(name)).items():
      _apply_override(config, key, value)
  for key, value in _flatten_overrides(overrides):
    _apply_override(config, key, value)
  validate_config(config)
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first inconsistent setting."""
  if config.family not in FAMILIES:
    raise ValueError(f'family must be one of {", ".join(FAMILIES)}, got {config.family!r}.')
  if config.family in _CONV_FAMILIES:
    for key in ('scan', 'remat', 'stochastic_depth'):
      if config[key]:
        raise ValueError(
          f'{key}={config[key]!r}: the {config.family} family ({config.name}) has no layer stack '
          f'for it; set model.{key} to its default (False / 0).'
        )
  if config.family == 'alternet':
    alternet.check_msa_stages(config.msa_stages, config.resnet.num_layers)
  if config.family == 'dvt':
    dvt.check_config(config)
  if config.family in _VIT_FAMILIES:
    if config.classifier not in vit.CLASSIFIERS:
      raise ValueError(f'classifier must be one of {vit.CLASSIFIERS}, got {config.classifier!r}.')
    if config.hidden_size % config.transformer.num_heads:
      raise ValueError(
        f'hidden_size {config.hidden_size} is not divisible by '
        f'transformer.num_heads {config.transformer.num_heads}.'
      )
    if config.attention_impl not in vit.ATTENTION_IMPLS:
      raise ValueError(f'attention_impl must be one of {vit.ATTENTION_IMPLS}.')
  if config.remat_policy not in common.REMAT_POLICIES:
    raise ValueError(
      f'remat_policy must be one of {", ".join(common.REMAT_POLICIES)}, got '
      f'{config.remat_policy!r}.'
    )
  if config.remat_policy != 'nothing' and not config.remat:
    raise ValueError(
      f'remat_policy={config.remat_policy!r} needs remat=True (it says what remat keeps).'
    )
  for key in ('dropout_rate', 'stochastic_depth'):
    if not 0.0 <= config[key] < 1.0:
      raise ValueError(f'{key} must be in [0, 1), got {config[key]}.')


def family(config: ml_collections.ConfigDict):
  """The module file of the config's model family (`vit`, `mixer`, `resnet`, `alternet`, `dvt`)."""
  if config.family not in FAMILIES:
    raise ValueError(f'family must be one of {", ".join(FAMILIES)}, got {config.family!r}.')
  return FAMILIES[config.family]


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The flax module described by `config` (from get_model_config): its keys are the fields."""
  validate_config(config)
  fields = {key: value for key, value in config.items() if key not in _NOT_FIELDS}
  return family(config).Model(**fields)


def get_model(name: str, num_classes: int | None = None, **overrides: Any) -> nn.Module:
  """`build_model(get_model_config(name, num_classes=..., **overrides))`."""
  if num_classes is not None:
    overrides['num_classes'] = num_classes
  return build_model(get_model_config(name, **overrides))


def num_layers(config: ml_collections.ConfigDict) -> int:
  """Number of blocks (transformer layers, Mixer blocks, or ResNet / AlterNet units)."""
  if config.family == 'mixer':
    return config.num_blocks
  if config.family in _CONV_FAMILIES:
    return sum(config.resnet.num_layers)
  return config.transformer.num_layers
