"""AlterNet (Park & Kim, "How Do Vision Transformers Work?", ICLR 2022): a ResNet whose last unit
of each late stage is a multi-head self-attention (MSA) block.

The convolutional parts are `models.resnet`'s BiT-style ResNet v1.5 (weight-standardised
convolutions, GroupNorm, bottleneck units); in each stage listed in `msa_stages` (numbered from 1)
the last unit is an MSA unit: the bottleneck with its 3x3 convolution replaced by multi-head
self-attention over the stage's feature map, flattened to (H * W) tokens. As in the paper's
attention block (a 1x1 convolution down to the bottleneck width, then attention whose output
projection restores the stage's width, residual), here: 1x1 `conv1` + `gn1` + ReLU, attention
(query / key / value / out of the ViT's attention, heads = bottleneck width / `msa_head_dim`),
`gn2` + ReLU, 1x1 `conv3` up to 4x the bottleneck width + `gn3` (zero-initialised scale), the
residual, ReLU. The attention is global over the stage's grid (at 32 px: 8x8 and 4x4 tokens; the
paper's blocks use windows of about that size), with no position embedding: the zero-padded
convolutions before it carry the positions, and the model keeps to no fixed resolution.

Parameter names (stages and units numbered from 1, as in the released BiT / hybrid files):
`conv_root/kernel`, `gn_root/{scale,bias}`;
convolutional units `block<s>/unit<u>/{conv1,conv2,conv3,conv_proj}/kernel` and
`block<s>/unit<u>/{gn1,gn2,gn3,gn_proj}/{scale,bias}`;
MSA units `block<s>/unit<u>/{conv1,conv3}/kernel`, `block<s>/unit<u>/{gn1,gn2,gn3}/{scale,bias}`
and, named like a released ViT's attention, `block<s>/unit<u>/MultiHeadDotProductAttention/
{query,key,value,out}/{kernel,bias}`; then `head/{kernel,bias}` after global average pooling.

Config keys (registry names `AlterNet-S`, `testing-alternet`): `resnet` = {`num_layers`,
`width_factor`, `root`, `num_groups`} as for the ResNet family, `msa_stages` (a stage needs at
least two units: its first one changes the width and resolution), `msa_head_dim`,
`num_classes`, `head_bias_init`, `dropout_rate` (before the head),
`attention_impl`, `dtype`, `param_dtype`, `matmul_dtype`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mixer_vit.models import common
from mixer_vit.models import precision
from mixer_vit.models import resnet
from mixer_vit.models import vit

Dtype = Any


class MSAUnit(nn.Module):
  """Bottleneck unit with multi-head self-attention in place of the 3x3 convolution."""

  features: int
  head_dim: int = 32
  num_groups: int = resnet.DEFAULT_NUM_GROUPS
  attention_impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    conv = lambda f, name: resnet.StdConv(  # noqa: E731
      f,
      (1, 1),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      matmul_dtype=self.matmul_dtype,
      name=name,
    )
    gn = lambda name, **kw: resnet.group_norm(  # noqa: E731
      name, self.dtype, self.param_dtype, self.num_groups, **kw
    )
    n, h, w, c = x.shape
    y = nn.relu(gn('gn1')(conv(self.features, 'conv1')(x)))
    y, _ = vit.MultiHeadDotProductAttention(
      num_heads=num_heads(self.features, self.head_dim),
      implementation=self.attention_impl,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      matmul_dtype=self.matmul_dtype,
      name='MultiHeadDotProductAttention',
    )(jnp.reshape(y, (n, h * w, self.features)))
    y = nn.relu(gn('gn2')(jnp.reshape(y, (n, h, w, self.features))))
    y = gn('gn3', scale_init=nn.initializers.zeros)(conv(c, 'conv3')(y))
    return nn.relu(x + y)


class AlterNetStage(nn.Module):
  """`num_units` units; the first may downsample; with `msa` the last one is an MSA block."""

  num_units: int
  features: int
  first_stride: tuple[int, int]
  msa: bool = False
  msa_head_dim: int = 32
  num_groups: int = resnet.DEFAULT_NUM_GROUPS
  attention_impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_units):
      if self.msa and i == self.num_units - 1:
        x = MSAUnit(
          self.features,
          head_dim=self.msa_head_dim,
          num_groups=self.num_groups,
          attention_impl=self.attention_impl,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          matmul_dtype=self.matmul_dtype,
          name=f'unit{i + 1}',
        )(x)
      else:
        x = resnet.ResidualUnit(
          self.features,
          self.first_stride if i == 0 else (1, 1),
          num_groups=self.num_groups,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          matmul_dtype=self.matmul_dtype,
          name=f'unit{i + 1}',
        )(x)
    return x


def num_heads(channels: int, head_dim: int) -> int:
  """Attention heads of an MSA unit over `channels` (at least one)."""
  return max(1, channels // head_dim)


def check_msa_stages(msa_stages: Sequence[int], num_layers: Sequence[int]) -> None:
  """Each MSA stage exists and has a convolutional unit before its MSA unit."""
  for stage in msa_stages:
    if not 1 <= stage <= len(num_layers):
      raise ValueError(
        f'msa_stages={tuple(msa_stages)}: stage {stage} does not exist; resnet.num_layers '
        f'{tuple(num_layers)} has stages 1..{len(num_layers)}.'
      )
    if num_layers[stage - 1] < 2:
      raise ValueError(
        f'msa_stages={tuple(msa_stages)}: stage {stage} has {num_layers[stage - 1]} unit; an MSA '
        'stage needs at least 2 (a convolutional unit, then the MSA unit). Raise resnet.num_layers.'
      )


class AlterNet(nn.Module):
  """AlterNet classifier (module docstring).

  Call as `apply({'params': p}, images, train=bool)` with images (B, H, W, 3) in [-1, 1];
  returns float32 logits (B, num_classes). `stochastic_depth`, `remat`, `remat_policy` and `scan`
  pass the shared config keys through; the registry refuses them set.
  """

  num_classes: int | None
  resnet: Mapping[str, Any]  # {'num_layers': (2, 2, 2), 'width_factor': 0.5, 'root', 'num_groups'}
  msa_stages: Sequence[int] = (2, 3)
  msa_head_dim: int = 32
  head_bias_init: float = 0.0
  dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  attention_impl: str = 'auto'
  remat: bool = False
  remat_policy: str = 'nothing'
  scan: bool = False
  dtype: Dtype = 'float32'
  param_dtype: Dtype = 'float32'
  matmul_dtype: Dtype | None = None

  def __post_init__(self):
    common.freeze_fields(self, 'resnet', 'msa_stages')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    common.check_images(images, 'AlterNet')
    dtype, param_dtype = common.to_dtype(self.dtype), common.to_dtype(self.param_dtype)
    matmul_dtype = precision.to_matmul_dtype(self.matmul_dtype)
    num_layers = tuple(self.resnet['num_layers'])
    check_msa_stages(self.msa_stages, num_layers)
    num_groups = self.resnet.get('num_groups', resnet.DEFAULT_NUM_GROUPS)
    x, width = resnet.root_block(
      images,
      width_factor=self.resnet.get('width_factor', 1.0),
      root=self.resnet.get('root', resnet.DEFAULT_ROOT),
      num_groups=num_groups,
      dtype=dtype,
      param_dtype=param_dtype,
      matmul_dtype=matmul_dtype,
    )
    for i, num_units in enumerate(num_layers):
      x = AlterNetStage(
        num_units,
        width * 2**i,
        (1, 1) if i == 0 else (2, 2),
        msa=i + 1 in self.msa_stages,
        msa_head_dim=self.msa_head_dim,
        num_groups=num_groups,
        attention_impl=self.attention_impl,
        dtype=dtype,
        param_dtype=param_dtype,
        matmul_dtype=matmul_dtype,
        name=f'block{i + 1}',
      )(x)
    return resnet.classify(self, x, train, param_dtype)


Model = AlterNet

# Checkpoints (see models.load_pretrained / load_params): as the ResNet family's.
LOAD_HINTS = {
  'block': 'AlterNet units follow config resnet.num_layers, width_factor and msa_stages; use the '
  'ones the checkpoint was trained with.',
}
fix_legacy = resnet.fix_legacy
num_grid_tokens = resnet.num_grid_tokens
adapt_pretrained = resnet.adapt_pretrained
