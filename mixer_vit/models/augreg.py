"""The file names of the AugReg release (gs://vit_models/augreg/, "How to train your ViT?").

Every released file name encodes its model and how it was trained:

  B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0
  (model)-(pretraining data)-(epochs)-(lr)-(augmentation)-(weight decay)-(dropout)-(stoch. depth)

and a fine-tuned file appends, after `--`, its target data set (a tfds name), the fine-tuning
steps (in thousands, rounded down: 500 steps are written `0k`, 2500 `2k`; the index's
`adapt_steps` column has the exact count), learning rate and resolution:

  B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384

`parse(name)` returns these facts as an `AugRegName` (the name may carry `.npz` and a directory or
`gs://vit_models/augreg/` prefix); `config_overrides(info)` is what `models.get_model_config` sets
for such a name: the head of the file (21843 classes for ImageNet-21k pretraining, 1000 for
ImageNet-1k, the target's classes for fine-tuned files), the fine-tuning resolution, and dropout
0 (the released files were fine-tuned without dropout or stochastic depth, as in vit_jax's
configs/augreg.py). The released ImageNet-21k files have no `pre_logits` layer, so
`representation_size` stays None.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

BUCKET = 'gs://vit_models/augreg'
URL = 'https://storage.googleapis.com/vit_models/augreg'

# The model prefixes of the released files (index.csv's `name` column beside it) and the
# registry name of each.
MODELS = {
  'Ti_16': ('ViT-Ti_16', 'Ti/16'),
  'S_16': ('ViT-S_16', 'S/16'),
  'S_32': ('ViT-S_32', 'S/32'),
  'B_8': ('ViT-B_8', 'B/8'),
  'B_16': ('ViT-B_16', 'B/16'),
  'B_32': ('ViT-B_32', 'B/32'),
  'L_16': ('ViT-L_16', 'L/16'),
  'R_Ti_16': ('R+ViT-Ti_16', 'R+Ti/16'),
  'R26_S_32': ('R26+ViT-S_32', 'R26+S/32'),
  'R50_L_32': ('R50+ViT-L_32', 'R50+L/32'),
}
# Head width of the pretraining data sets.
PRETRAIN_CLASSES = {'i1k': 1000, 'i21k': 21843}
# Classes of the fine-tuning targets of the release (kitti: VTAB's closest-vehicle distance).
TARGET_CLASSES = {
  'imagenet2012': 1000,
  'cifar100': 100,
  'oxford_iiit_pet': 37,
  'resisc45': 45,
  'kitti': 4,
}
_NUMBER = r'\d+(?:\.\d+)?(?:e-?\d+)?'
_UPSTREAM_PARTS = (
  # (what, pattern) of the parts after the model prefix.
  ('pretraining data set (i1k or i21k)', r'(i1k|i21k)'),
  ('epochs (<N>ep)', r'(\d+)ep'),
  ('learning rate (lr_<number>)', rf'lr_({_NUMBER})'),
  ('augmentation (aug_<level>)', r'aug_([a-z]+\d*)'),
  ('weight decay (wd_<number>)', rf'wd_({_NUMBER})'),
  ('dropout (do_<number>)', rf'do_({_NUMBER})'),
  ('stochastic depth (sd_<number>)', rf'sd_({_NUMBER})'),
)
_ADAPT_PARTS = (
  ('target data set (a tfds name)', r'([a-z][a-z0-9_]*)'),
  ('steps (steps_<N>k)', r'steps_(\d+)k'),
  ('learning rate (lr_<number>)', rf'lr_({_NUMBER})'),
  ('resolution (res_<N>)', r'res_(\d+)'),
)
# A name that looks like a release file: a prefix, then the pretraining data set.
_LOOKS_LIKE_FILE = re.compile(r'^[A-Za-z0-9_]+-i\d+k-')


@dataclasses.dataclass(frozen=True)
class AugRegName:
  """What a released AugReg file name says. The `target_*` fields are None for pretraining files."""

  filename: str  # The name without directory and `.npz`.
  prefix: str  # 'B_16', 'R26_S_32', ...
  model: str  # The registry name: 'ViT-B_16', 'R26+ViT-S_32', ...
  paper_name: str  # As in the paper and index.csv's `name` column: 'B/16', 'R26+S/32', ...
  pretrain_dataset: str  # 'i1k' or 'i21k'
  epochs: int
  lr: float
  aug: str  # 'none', 'light0', 'light1', 'medium1', 'medium2', 'strong1', 'strong2'
  wd: float
  dropout: float
  stochastic_depth: float
  target_dataset: str | None = None  # tfds name: 'imagenet2012', 'cifar100', ...
  target_steps_k: int | None = None  # Thousands, rounded down (500 steps: 0).
  target_lr: float | None = None
  resolution: int | None = None

  @property
  def fine_tuned(self) -> bool:
    return self.target_dataset is not None

  @property
  def upstream(self) -> str:
    """The pretraining file this one was fine-tuned from (itself for a pretraining file)."""
    return self.filename.split('--')[0]

  @property
  def index_dataset(self) -> str:
    """index.csv's `ds` value: 'i1k', 'i21k', or 'i21k_30' (30 epochs)."""
    if self.pretrain_dataset == 'i21k' and self.epochs != 300:
      return f'i21k_{self.epochs}'
    return self.pretrain_dataset

  @property
  def gs_path(self) -> str:
    return f'{BUCKET}/{self.filename}.npz'

  @property
  def url(self) -> str:
    return f'{URL}/{self.filename}.npz'

  @property
  def num_classes(self) -> int | None:
    """Head width of the file (None for a target data set outside the release)."""
    if self.fine_tuned:
      return TARGET_CLASSES.get(self.target_dataset)
    return PRETRAIN_CLASSES[self.pretrain_dataset]


def strip(name: str) -> str:
  """`name` without directory (`gs://vit_models/augreg/`, a local folder) and `.npz`."""
  name = name.rstrip('/').rsplit('/', 1)[-1]
  return name[: -len('.npz')] if name.endswith('.npz') else name


def is_file_name(name: str) -> bool:
  """Whether `name` has the shape of a release file name (`PREFIX-i21k-...`)."""
  return bool(_LOOKS_LIKE_FILE.match(strip(name)))


def _model(prefix: str, filename: str) -> tuple[str, str]:
  if prefix not in MODELS:
    raise ValueError(
      f'Unknown AugReg model {prefix!r} in {filename!r}. The release has the models '
      f'{", ".join(MODELS)}.'
    )
  return MODELS[prefix]


def _parts(text: str, spec, filename: str, example: str) -> list[str]:
  tokens = text.split('-')
  if len(tokens) != len(spec):
    raise ValueError(
      f'{filename!r} is no AugReg file name: {text!r} has {len(tokens)} parts separated by '
      f'"-", expected {len(spec)}: {", ".join(what for what, _ in spec)} (as in {example!r}).'
    )
  values = []
  for token, (what, pattern) in zip(tokens, spec, strict=True):
    match = re.fullmatch(pattern, token)
    if not match:
      raise ValueError(f'{filename!r} is no AugReg file name: expected the {what}, got {token!r}.')
    values.append(match.group(1))
  return values


def parse(name: str) -> AugRegName:
  """The facts of an AugReg file name (pretraining or fine-tuned); a ValueError says what's off."""
  filename = strip(name)
  upstream, sep, adapt = filename.partition('--')
  prefix, dash, rest = upstream.partition('-')
  model, paper_name = _model(prefix, filename)
  if not dash:
    raise ValueError(
      f'{filename!r} is only a model; an AugReg file name goes on with the pretraining, '
      'e.g. B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.'
    )
  ds, epochs, lr, aug, wd, do, sd = _parts(
    rest, _UPSTREAM_PARTS, filename, 'i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0'
  )
  facts: dict[str, Any] = {}
  if sep:
    target, steps, target_lr, res = _parts(
      adapt, _ADAPT_PARTS, filename, 'imagenet2012-steps_20k-lr_0.01-res_384'
    )
    facts = dict(
      target_dataset=target,
      target_steps_k=int(steps),
      target_lr=float(target_lr),
      resolution=int(res),
    )
  return AugRegName(
    filename=filename,
    prefix=prefix,
    model=model,
    paper_name=paper_name,
    pretrain_dataset=ds,
    epochs=int(epochs),
    lr=float(lr),
    aug=aug,
    wd=float(wd),
    dropout=float(do),
    stochastic_depth=float(sd),
    **facts,
  )


def model_prefix(name: str) -> str:
  """The file prefix ('B_16') of a released model named 'B/16', 'B_16', 'ViT-B_16' or a file."""
  for prefix, (registry_name, paper_name) in MODELS.items():
    if name in (prefix, registry_name, paper_name):
      return prefix
  if is_file_name(name):
    return parse(name).prefix
  raise ValueError(
    f'{name!r} is no model of the AugReg release. Its models: '
    + ', '.join(f'{paper} ({prefix}, {registry})' for prefix, (registry, paper) in MODELS.items())
    + '.'
  )


def config_overrides(info: AugRegName) -> dict[str, Any]:
  """The model-config settings a released file needs (see the module docstring)."""
  overrides: dict[str, Any] = {'dropout_rate': 0.0, 'stochastic_depth': 0.0}
  if info.num_classes is not None:
    overrides['num_classes'] = info.num_classes
  if info.resolution is not None:
    overrides['image_size'] = (info.resolution, info.resolution)
  return overrides
