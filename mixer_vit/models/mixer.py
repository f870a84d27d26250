"""MLP-Mixer as a flax.linen module, and what loading its checkpoints needs.

Parameter names are those of the released Mixer checkpoints: `stem`,
`MixerBlock_<i>/{LayerNorm_0, token_mixing/Dense_0, token_mixing/Dense_1, LayerNorm_1,
channel_mixing/Dense_0, channel_mixing/Dense_1}`, `pre_head_layer_norm`, `head`. LayerNorm eps
1e-6, tanh-approximated GELU, default (lecun-normal / zero) Dense initialisation,
zero-initialised head.

The module's fields are the model config's keys: `patches={'size': (16, 16)}`, `hidden_size`,
`num_blocks`, `tokens_mlp_dim`, `channels_mlp_dim`, ...

Checkpoints: the token-mixing layers are as wide as the number of patches, so a checkpoint fits
only the token grid it was trained for (nothing is resized); that width tells the resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mixer_vit.models import common
from mixer_vit.models import params_io
from mixer_vit.models import precision
from mixer_vit.runtime import sizes

Dtype = Any


class MixerBlock(nn.Module):
  """Token mixing (MLP across patches) then channel mixing, both pre-norm.

  Sows its output ('blocks') when the 'intermediates' collection is mutable.
  """

  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout_rate: float = 0.0
  use_drop_path: bool = False
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, drop_rate):
    norm = lambda name: nn.LayerNorm(
      epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    mlp = lambda dim, name: common.MlpBlock(
      dim,
      dropout_rate=self.dropout_rate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      matmul_dtype=self.matmul_dtype,
      name=name,
    )
    skip_drop_path = self.deterministic or not self.use_drop_path

    y = jnp.swapaxes(norm('LayerNorm_0')(x), 1, 2)
    y = mlp(self.tokens_mlp_dim, 'token_mixing')(y, deterministic=self.deterministic)
    x = x + common.drop_path(self, jnp.swapaxes(y, 1, 2), drop_rate, skip_drop_path)
    y = mlp(self.channels_mlp_dim, 'channel_mixing')(
      norm('LayerNorm_1')(x), deterministic=self.deterministic
    )
    x = x + common.drop_path(self, y, drop_rate, skip_drop_path)
    self.sow(common.INTERMEDIATES, 'blocks', x)
    return x, None


class MlpMixer(nn.Module):
  """Mixer classifier.

  Call as `apply({'params': p}, images, train=bool)` with images (B, H, W, 3) in [-1, 1];
  returns float32 logits (B, num_classes). `models.apply_with_intermediates` also returns the
  blocks' outputs.
  """

  num_classes: int | None
  patches: Mapping[str, Any]  # {'size': (ph, pw)}
  hidden_size: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  head_bias_init: float = 0.0
  dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  remat: bool = False
  remat_policy: str = 'nothing'
  scan: bool = False
  dtype: Dtype = 'float32'
  param_dtype: Dtype = 'float32'
  matmul_dtype: Dtype | None = None

  def __post_init__(self):
    common.freeze_fields(self, 'patches')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    common.check_images(images, 'MlpMixer')
    dtype, param_dtype = common.to_dtype(self.dtype), common.to_dtype(self.param_dtype)
    matmul_dtype = precision.to_matmul_dtype(self.matmul_dtype)
    patch = sizes.pair(self.patches['size'], 'patches.size')
    # 'SAME' like the original stem; equals 'VALID' when patches tile the image.
    x = nn.Conv(
      self.hidden_size,
      patch,
      strides=patch,
      padding='SAME',
      dtype=dtype,
      param_dtype=param_dtype,
      name='stem',
      **precision.matmul_kwargs(matmul_dtype, conv=True),
    )(images)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    x = common.layer_stack(
      MixerBlock,
      x,
      num_layers=self.num_blocks,
      name='MixerBlock',
      scan=self.scan,
      remat=self.remat,
      remat_policy=self.remat_policy,
      stochastic_depth=self.stochastic_depth,
      tokens_mlp_dim=self.tokens_mlp_dim,
      channels_mlp_dim=self.channels_mlp_dim,
      dropout_rate=self.dropout_rate,
      use_drop_path=self.stochastic_depth > 0,
      deterministic=not train,
      dtype=dtype,
      param_dtype=param_dtype,
      matmul_dtype=matmul_dtype,
    )
    x = nn.LayerNorm(
      epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name='pre_head_layer_norm'
    )(x)
    self.sow(common.INTERMEDIATES, 'encoded', x)
    x = jnp.mean(x, axis=1).astype(jnp.float32)
    self.sow(common.INTERMEDIATES, common.HEAD_INPUT, x)
    if self.num_classes:
      x = common.classifier_head(x, self.num_classes, self.head_bias_init, param_dtype)
    return x


Model = MlpMixer


# ------------------------------------------------------------------------------------------------
# Checkpoints (see models.load_pretrained / load_params).

Params = dict[str, Any]

LOAD_HINTS = {
  '/token_mixing/': 'Mixer token-mixing layers are tied to the number of patches; use the '
  'image_size (and patch size) the checkpoint was trained with.',
}


def fix_legacy(params: Mapping) -> Mapping:
  """No older Mixer file variants are known: the tree as it is."""
  return params


def num_grid_tokens(params: Mapping) -> int | None:
  """Patch tokens the checkpoint was made for: the width of the token-mixing layers."""
  try:
    if 'MixerBlock' in params:  # scan-stacked: leading layer axis
      return params_io.shape(params['MixerBlock']['token_mixing']['Dense_0']['kernel'])[1]
    return params_io.shape(params['MixerBlock_0']['token_mixing']['Dense_0']['kernel'])[0]
  except KeyError:
    return None


def adapt_pretrained(
  restored: Params,
  expected: Mapping,
  config: Any,
  source_grid: tuple[int, int] | None = None,
) -> None:
  """Nothing beyond the new head: the token-mixing layers fix the grid (no resizing)."""
  del restored, expected, config, source_grid
