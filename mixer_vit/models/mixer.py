"""MLP-Mixer as a flax.linen module.

Parameter names are those of the released Mixer checkpoints: `stem`,
`MixerBlock_<i>/{LayerNorm_0, token_mixing/Dense_0, token_mixing/Dense_1,
LayerNorm_1, channel_mixing/Dense_0, channel_mixing/Dense_1}`,
`pre_head_layer_norm`, `head`. LayerNorm eps 1e-6, tanh-approximated GELU,
default (lecun-normal / zero) Dense initialisation, zero-initialised head.
"""

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from mixer_vit.models import common

Dtype = Any


class MixerBlock(nn.Module):
  """Token mixing (MLP across patches) then channel mixing, both pre-norm."""

  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout_rate: float = 0.0
  use_drop_path: bool = False
  deterministic: bool = True
  collect: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, drop_rate):
    norm = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    mlp = lambda dim, name: common.MlpBlock(  # noqa: E731
        dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    skip_drop_path = self.deterministic or not self.use_drop_path

    y = jnp.swapaxes(norm('LayerNorm_0')(x), 1, 2)
    y = mlp(self.tokens_mlp_dim, 'token_mixing')(
        y, deterministic=self.deterministic)
    x = x + common.drop_path(self, jnp.swapaxes(y, 1, 2), drop_rate,
                             skip_drop_path)
    y = mlp(self.channels_mlp_dim, 'channel_mixing')(
        norm('LayerNorm_1')(x), deterministic=self.deterministic)
    x = x + common.drop_path(self, y, drop_rate, skip_drop_path)
    return x, (x if self.collect else None)


class MlpMixer(nn.Module):
  """Mixer classifier.

  Call as `apply({'params': p}, images, train=bool)` with images
  (B, H, W, 3) in [-1, 1]; returns float32 logits (B, num_classes) and, with
  `return_intermediates=True`, also a dict with 'blocks' (layers, B, T, D),
  'encoded' (B, T, D) and 'pre_logits' (B, D).
  """

  num_classes: int
  patch_size: Tuple[int, int]
  hidden_size: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  head_bias_init: float = 0.0
  dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False,
               return_intermediates: bool = False):
    common.check_images(images, 'MlpMixer')
    # 'SAME' like the original stem; equals 'VALID' when patches tile the image.
    x = nn.Conv(self.hidden_size, self.patch_size, strides=self.patch_size,
                padding='SAME', dtype=self.dtype, param_dtype=self.param_dtype,
                name='stem')(images)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    x, blocks = common.layer_stack(
        MixerBlock, x, num_layers=self.num_blocks, name='MixerBlock',
        scan=self.scan, remat=self.remat,
        stochastic_depth=self.stochastic_depth,
        tokens_mlp_dim=self.tokens_mlp_dim,
        channels_mlp_dim=self.channels_mlp_dim,
        dropout_rate=self.dropout_rate,
        use_drop_path=self.stochastic_depth > 0, deterministic=not train,
        collect=return_intermediates, dtype=self.dtype,
        param_dtype=self.param_dtype)
    encoded = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                           param_dtype=self.param_dtype,
                           name='pre_head_layer_norm')(x)
    x = pre_logits = jnp.mean(encoded, axis=1).astype(jnp.float32)
    if self.num_classes:
      x = common.classifier_head(x, self.num_classes, self.head_bias_init,
                                 self.param_dtype)
    if not return_intermediates:
      return x
    return x, {'blocks': blocks, 'encoded': encoded, 'pre_logits': pre_logits}


def token_grid(image_size: Tuple[int, int], patch_size: Tuple[int, int]):
  """(rows, cols) of the patch grid ('SAME' stem rounds up)."""
  return (-(-image_size[0] // patch_size[0]), -(-image_size[1] // patch_size[1]))
