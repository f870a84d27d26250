"""Vision Transformer (and R+ViT hybrids) as a flax.linen module.

Parameter names and shapes are those of the released `.npz` checkpoints
(google-research/vision_transformer): `embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_<i>/`
{`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`},
`Transformer/encoder_norm`, `pre_logits`, `head`. Numerics follow that code:
LayerNorm eps 1e-6, tanh-approximated GELU, attention logits scaled by
1/sqrt(head_dim), pre-norm residual blocks.
"""

from typing import Any, Optional, Tuple

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from mixer_vit.models import common
from mixer_vit.models import resnet

Dtype = Any

CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'explicit')


def _fused_attention(q, k, v, implementation: str):
  """softmax(q k^T / sqrt(d)) v through jax.nn.dot_product_attention.

  'auto' uses cuDNN flash attention on GPU for half-precision inputs and
  falls back to the XLA implementation when cuDNN rejects the shapes.
  """
  if implementation == 'auto':
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    if half and jax.default_backend() == 'gpu':
      try:
        return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
      except (ValueError, NotImplementedError, RuntimeError, TypeError):
        pass
    implementation = 'xla'
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the parameter layout of flax's original MHA.

  query/key/value kernels are (D, heads, head_dim), the output kernel is
  (heads, head_dim, D). Returns (output, weights); weights (B, heads, Tq, Tk)
  are only computed (explicitly) when `return_weights` is set, and the
  explicit path is also used for attention dropout during training.
  """

  num_heads: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  return_weights: bool = False
  implementation: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None):
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    features = inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f'hidden size {features} is not divisible by '
                       f'num_heads={self.num_heads}.')
    head_dim = features // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    q = dense('query')(inputs_q)
    k = dense('key')(inputs_kv)
    v = dense('value')(inputs_kv)

    use_dropout = self.dropout_rate > 0 and not self.deterministic
    if self.return_weights or use_dropout or self.implementation == 'explicit':
      q = q / jnp.sqrt(head_dim).astype(q.dtype)
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      weights = weights.astype(self.dtype)
      used = nn.Dropout(rate=self.dropout_rate)(
          weights, deterministic=not use_dropout)
      out = jnp.einsum('bhqk,bkhd->bqhd', used, v)
    else:
      out = _fused_attention(q, k, v, self.implementation)
      weights = None

    out = nn.DenseGeneral(
        features=features, axis=(-2, -1), dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name='out')(out)
    return out, (weights if self.return_weights else None)


def _vit_mlp(mlp_dim, dropout_rate, dtype, param_dtype, name=None):
  return common.MlpBlock(
      mlp_dim, dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.normal(stddev=1e-6), name=name)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  use_drop_path: bool = False
  deterministic: bool = True
  collect: bool = False
  attention_impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, drop_rate):
    norm = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    skip_drop_path = self.deterministic or not self.use_drop_path

    y = norm('LayerNorm_0')(x)
    y, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
        deterministic=self.deterministic, return_weights=self.collect,
        implementation=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='MultiHeadDotProductAttention_1')(y)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=self.deterministic)
    x = x + common.drop_path(self, y, drop_rate, skip_drop_path)

    y = norm('LayerNorm_2')(x)
    y = _vit_mlp(self.mlp_dim, self.dropout_rate, self.dtype, self.param_dtype,
                 name='MlpBlock_3')(y, deterministic=self.deterministic)
    x = x + common.drop_path(self, y, drop_rate, skip_drop_path)
    return x, ((x, weights) if self.collect else None)


class Encoder(nn.Module):
  """Position embedding, dropout, the blocks and the final LayerNorm."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  attention_impl: str = 'auto'
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, collect: bool = False):
    x = AddPositionEmbs(param_dtype=self.param_dtype, name='posembed_input')(x)
    x = x.astype(self.dtype)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x, per_layer = common.layer_stack(
        EncoderBlock, x, num_layers=self.num_layers, name='encoderblock',
        scan=self.scan, remat=self.remat,
        stochastic_depth=self.stochastic_depth,
        mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        use_drop_path=self.stochastic_depth > 0, deterministic=not train,
        collect=collect, attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='encoder_norm')(x)
    return x, per_layer


class AddPositionEmbs(nn.Module):
  """Learned position embedding (1, tokens, D), BERT-style N(0, 0.02) init."""

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (1, x.shape[1], x.shape[2])
    try:
      pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                      shape, self.param_dtype)
    except flax.errors.ScopeParamShapeError as e:
      raise ValueError(
          f'The input gives {x.shape[1]} tokens but the position embedding '
          f'was made for a different count ({e}). Feed images of the '
          'resolution the parameters were made for, or adapt them with '
          'mixer_vit.checkpoint.load_pretrained (which resizes the grid).'
      ) from e
    return x + pe.astype(x.dtype)


class MAPHead(nn.Module):
  """Multi-head attention pooling with a learned probe (big_vision names)."""

  num_heads: int
  mlp_dim: int
  attention_impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    probe = self.param('probe', nn.initializers.xavier_uniform(),
                       (1, 1, x.shape[-1]), self.param_dtype)
    probe = jnp.tile(probe.astype(x.dtype), [x.shape[0], 1, 1])
    y, _ = MultiHeadDotProductAttention(
        num_heads=self.num_heads, implementation=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name='MultiHeadDotProductAttention_0')(probe, x)
    z = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='LayerNorm_0')(y)
    y = y + _vit_mlp(self.mlp_dim, 0.0, self.dtype, self.param_dtype,
                     name='MlpBlock_0')(z)
    return y[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier; `resnet_layers` set makes it an R+ViT hybrid.

  Call as `apply({'params': p}, images, train=bool)` with images
  (B, H, W, 3) in [-1, 1]. Returns float32 logits (B, num_classes) — or
  (B, tokens, num_classes) for the 'unpooled' classifiers — and, with
  `return_intermediates=True`, also a dict with 'blocks' (layers, B, T, D),
  'attention' (layers, B, heads, T, T), 'encoded' (B, T, D) and
  'pre_logits'.
  """

  num_classes: int
  patch_size: Tuple[int, int]
  hidden_size: int
  num_layers: int
  mlp_dim: int
  num_heads: int
  classifier: str = 'token'
  representation_size: Optional[int] = None
  resnet_layers: Optional[Tuple[int, ...]] = None
  resnet_width_factor: float = 1.0
  head_bias_init: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  attention_impl: str = 'auto'
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check_options(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'Unknown classifier {self.classifier!r}; choose one '
                       f'of {CLASSIFIERS}.')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'Unknown attention_impl {self.attention_impl!r}; '
                       f'choose one of {ATTENTION_IMPLS}.')

  @nn.compact
  def __call__(self, images, *, train: bool = False,
               return_intermediates: bool = False):
    self._check_options()
    common.check_images(images, 'VisionTransformer')
    x = images
    if self.resnet_layers is not None:
      x = resnet.resnet_stem(
          x, num_layers=self.resnet_layers,
          width_factor=self.resnet_width_factor, dtype=self.dtype,
          param_dtype=self.param_dtype)

    x = nn.Conv(self.hidden_size, self.patch_size, strides=self.patch_size,
                padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='embedding')(x)
    n, h, w, c = x.shape
    if h * w == 0:
      raise ValueError(f'Images of shape {images.shape} are smaller than one '
                       f'patch ({self.patch_size}).')
    x = jnp.reshape(x, (n, h * w, c))

    if self.classifier in ('token', 'token_unpooled'):
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c),
                       self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], 1)

    x, per_layer = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim,
        num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth,
        attention_impl=self.attention_impl, remat=self.remat, scan=self.scan,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name='Transformer')(x, train=train, collect=return_intermediates)
    encoded = x

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    elif self.classifier == 'map':
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, name='MAPHead_0')(x)
    # 'unpooled' / 'token_unpooled' keep every token.

    x = x.astype(jnp.float32)
    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=jnp.float32,
                   param_dtype=self.param_dtype, name='pre_logits')(x)
      x = jnp.tanh(x)
    pre_logits = x

    if self.num_classes:
      x = common.classifier_head(x, self.num_classes, self.head_bias_init,
                                 self.param_dtype)
    if not return_intermediates:
      return x
    blocks, attention = per_layer
    return x, {'blocks': blocks, 'attention': attention, 'encoded': encoded,
               'pre_logits': pre_logits}


def token_grid(image_size: Tuple[int, int], patch_size: Tuple[int, int],
               resnet_layers: Optional[Tuple[int, ...]] = None):
  """(rows, cols) of the patch grid a ViT makes from an (H, W) image."""
  h, w = image_size
  if resnet_layers is not None:
    h = resnet.stem_output_size(h, resnet_layers)
    w = resnet.stem_output_size(w, resnet_layers)
  return h // patch_size[0], w // patch_size[1]


def total_stride(patch_size, resnet_layers=None) -> Tuple[int, int]:
  s = 1 if resnet_layers is None else resnet.stem_stride(resnet_layers)
  return patch_size[0] * s, patch_size[1] * s

