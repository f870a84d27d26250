"""Vision Transformer (and R+ViT hybrids) as a flax.linen module, and loading its checkpoints.

Parameter names and shapes are those of the released `.npz` checkpoints
(google-research/vision_transformer): `embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_<i>/` {`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`}, `Transformer/encoder_norm`, `pre_logits`, `head`. Numerics follow that code:
LayerNorm eps 1e-6, tanh-approximated GELU, attention logits scaled by 1/sqrt(head_dim), pre-norm
residual blocks.

The module's fields are the model config's keys (vit_jax layout): `patches={'size': (16, 16)}`,
`transformer={'num_layers': 12, 'mlp_dim': 3072, 'num_heads': 12}`, `resnet=None` or
`{'num_layers': (3, 4, 9), 'width_factor': 1.0}` (optional `'root'`: `resnet.ROOTS`, and
`'num_groups'`, GroupNorm's groups, 32), ...

The second half adapts checkpoints to the model (used by `models.load_pretrained` /
`load_params`): position embeddings resized to a new grid, the class token, pre_logits and MAP
heads, and older file variants.
"""

from __future__ import annotations

from collections.abc import Mapping
import logging
import re
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit.models import common
from mixer_vit.models import geometry
from mixer_vit.models import params_io
from mixer_vit.models import precision
from mixer_vit.models import resnet
from mixer_vit.runtime import sizes

Dtype = Any

CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'explicit')


# cuDNN's flash attention (through jax.nn.dot_product_attention) refused ViT's 197 tokens on an
# H200 ("Unsupported sequence length Q 197, KV 197", jax 0.11.2) and took them padded to 208 or
# 256 with the true lengths passed as query_seq_lengths / key_value_seq_lengths (1.48 / 1.54 ms
# per layer, forward and backward, against XLA's 2.72 ms; batch 256, 12 heads, head dim 64,
# bfloat16). The 'cudnn' path pads both sequences to a multiple of this (197 -> 208, the faster).
CUDNN_SEQ_MULTIPLE = 16
# The kernel `padded_attention` hands the padded sequences to on the 'cudnn' path: cuDNN's. Tests
# set it to 'xla', which applies the same lengths as a mask, to check the padding on any backend.
_CUDNN_KERNEL = 'cudnn'
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_head_dim_max() -> int:
  """The largest head dimension cuDNN's flash attention takes on this GPU: 256 from Hopper
  (compute capability 9.0) on, 128 before (jax's own check)."""
  capability = str(getattr(jax.devices()[0], 'compute_capability', '0'))
  major = int(capability.split('.')[0]) if capability.split('.')[0].isdigit() else 0
  return 256 if major >= 9 else 128


def cudnn_accepts(head_dim: int, dtype, head_dim_max: int = 128) -> bool:
  """Whether cuDNN's flash attention takes these heads once the sequences are padded to a multiple
  of `CUDNN_SEQ_MULTIPLE` (which the 'cudnn' path does): half-precision inputs, a head dimension
  that is a multiple of 8 and at most `head_dim_max`."""
  return jnp.dtype(dtype) in HALF_DTYPES and head_dim % 8 == 0 and 0 < head_dim <= head_dim_max


def resolve_attention_impl(
  implementation: str,
  dtype,
  head_dim: int | None = None,
  platform: str | None = None,
  head_dim_max: int | None = None,
) -> str:
  """The implementation 'auto' stands for on this platform, dtype and head size: the fastest one
  measured that takes them, never one that raises.

  CPU: plain einsum ('explicit'); XLA's fused path was about 10 % slower for a ViT-Ti/16 training
  step on the 2-core development machine. CUDA GPU with half-precision inputs and a head
  dimension cuDNN takes (`cudnn_accepts`): 'cudnn', flash attention on the sequences padded to a
  multiple of `CUDNN_SEQ_MULTIPLE` with the padded keys masked (`padded_attention`), so every
  token count is taken (197, 577, 50, 257, a hybrid's grid, a MAP head's single query).
  Elsewhere (TPU, ROCm, float32, other head sizes): 'xla'. `platform` ('cpu', 'tpu', 'cuda',
  'rocm'; default this machine's) and `head_dim_max` (default this GPU's) are for tests.
  """
  if implementation != 'auto':
    return implementation
  platform = platform or precision.accelerator_platform()
  if platform == 'cpu':
    return 'explicit'
  if platform == 'cuda' and jnp.dtype(dtype) in HALF_DTYPES:
    if head_dim_max is None:
      head_dim_max = cudnn_head_dim_max() if jax.default_backend() == 'gpu' else 128
    if head_dim is None or cudnn_accepts(head_dim, dtype, head_dim_max):
      return 'cudnn'
  return 'xla'


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_tokens(x, length: int):
  """(B, T, heads, head_dim) with zeros appended along T up to `length`."""
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def padded_attention(q, k, v, kernel: str = 'cudnn', multiple: int = CUDNN_SEQ_MULTIPLE):
  """softmax(q k^T / sqrt(d)) v with queries and keys padded to a multiple of `multiple` tokens.

  q (B, Tq, heads, d), k and v (B, Tk, heads, d). The padding is zeros; `query_seq_lengths` and
  `key_value_seq_lengths` (Tq, Tk for every example) make `jax.nn.dot_product_attention` mask the
  padded keys out of every softmax (their weights are exactly 0) and skip the padded queries, whose
  rows are then cut off: the result, and its gradients, are those of the unpadded attention.
  `kernel`: 'cudnn' (flash attention, which refuses lengths such as 197) or 'xla' (the same
  lengths applied as a mask: how the padding is tested on any backend).
  """
  tq, tk = q.shape[1], k.shape[1]
  pq, pk = _round_up(tq, multiple), _round_up(tk, multiple)
  if (pq, pk) == (tq, tk):
    return jax.nn.dot_product_attention(q, k, v, implementation=kernel)
  batch = q.shape[0]
  out = jax.nn.dot_product_attention(
    _pad_tokens(q, pq),
    _pad_tokens(k, pk),
    _pad_tokens(v, pk),
    query_seq_lengths=jnp.full((batch,), tq, jnp.int32),
    key_value_seq_lengths=jnp.full((batch,), tk, jnp.int32),
    implementation=kernel,
  )
  return out[:, :tq]


@jax.custom_jvp
def softmax(logits):
  """`jax.nn.softmax(logits, axis=-1)` (the same numbers) whose gradient keeps only its output.

  jax's default rule differentiates through the division, so the backward pass keeps the
  unnormalised exponentials and a materialised (batch, heads, tokens, tokens) broadcast of the
  denominator; this one is y * (g - sum(y * g)), the rule of the `jax_softmax_custom_jvp` flag.
  """
  return jax.nn.softmax(logits, axis=-1)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
  (logits,), (logits_dot,) = primals, tangents
  y = softmax(logits)
  return y, y * (logits_dot - jnp.sum(y * logits_dot, axis=-1, keepdims=True))


def _fused_attention(q, k, v, implementation: str, fallback: bool = False):
  """softmax(q k^T / sqrt(d)) v via jax.nn.dot_product_attention: 'xla', or 'cudnn' on sequences
  padded for it (`padded_attention`); ``fallback``: where cuDNN raises while tracing, 'xla'."""
  if implementation == 'cudnn':
    try:
      return padded_attention(q, k, v, _CUDNN_KERNEL)
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
      if not fallback:
        reason = str(e).strip().splitlines()[0].rstrip('.') if str(e).strip() else type(e).__name__
        raise ValueError(
          f"attention_impl='cudnn' cannot run here ({reason}; {q.dtype} heads of {q.shape[-1]} on "
          f"{jax.default_backend()}); set model.attention_impl='auto' or 'xla'."
        ) from None
      implementation = 'xla'
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the parameter layout of flax's original MHA.

  query/key/value kernels are (D, heads, head_dim), the output kernel is (heads, head_dim, D).
  Returns (output, weights); weights (B, heads, Tq, Tk) are only computed (explicitly) when
  `return_weights` is set, and the explicit path is also used for attention dropout during
  training. `return_logits` returns the attention logits (float32, before the softmax) in place
  of the weights, and a `logits_bias` (B, heads, Tq, Tk) passed to the call is added to the logits
  before the softmax (the Dynamic ViT's relationship reuse); both take the explicit path.
  """

  num_heads: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  return_weights: bool = False
  return_logits: bool = False
  implementation: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, logits_bias=None):
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    features = inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f'hidden size {features} is not divisible by num_heads={self.num_heads}.')
    head_dim = features // self.num_heads
    dense = lambda name: nn.DenseGeneral(
      features=(self.num_heads, head_dim),
      axis=-1,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      name=name,
      **precision.matmul_kwargs(self.matmul_dtype),
    )
    q = dense('query')(inputs_q)
    k = dense('key')(inputs_kv)
    v = dense('value')(inputs_kv)

    use_dropout = self.dropout_rate > 0 and not self.deterministic
    mixed = self.matmul_dtype is not None
    implementation = resolve_attention_impl(
      self.implementation, self.matmul_dtype if mixed else q.dtype, head_dim
    )
    explicit = self.return_logits or logits_bias is not None or implementation == 'explicit'
    if self.return_weights or use_dropout or explicit:
      q = q / jnp.sqrt(head_dim).astype(q.dtype)
      if mixed:  # The two products as dot_generals: (batch, heads) are batch dimensions.
        dot = precision.mixed_dot_general(self.matmul_dtype)
        logits = dot(q, k, (((3,), (3,)), ((0, 2), (0, 2))))  # bqhd,bkhd->bhqk
      else:
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
      logits = logits.astype(jnp.float32)
      if logits_bias is not None:
        logits = logits + logits_bias.astype(jnp.float32)
      weights = softmax(logits)
      weights = weights.astype(self.dtype)
      used = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=not use_dropout)
      if mixed:
        out = jnp.swapaxes(dot(used, v, (((3,), (1,)), ((0, 1), (0, 2)))), 1, 2)  # bhqk,bkhd
      else:
        out = jnp.einsum('bhqk,bkhd->bqhd', used, v)
    else:
      if mixed:  # The fused kernels take half-precision inputs and compute softmax in float32.
        q, k, v = (a.astype(self.matmul_dtype) for a in (q, k, v))
      out = _fused_attention(q, k, v, implementation, fallback=self.implementation == 'auto')
      out = out.astype(self.dtype)
      weights = logits = None

    out = nn.DenseGeneral(
      features=features,
      axis=(-2, -1),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      name='out',
      **precision.matmul_kwargs(self.matmul_dtype),
    )(out)
    if self.return_logits:
      return out, logits
    return out, (weights if self.return_weights else None)


def _vit_mlp(mlp_dim, dropout_rate, dtype, param_dtype, matmul_dtype, name=None):
  return common.MlpBlock(
    mlp_dim,
    dropout_rate=dropout_rate,
    dtype=dtype,
    param_dtype=param_dtype,
    matmul_dtype=matmul_dtype,
    kernel_init=nn.initializers.xavier_uniform(),
    bias_init=nn.initializers.normal(stddev=1e-6),
    name=name,
  )


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + MHA(LN(x)); x + MLP(LN(x)).

  Sows its output ('blocks') and, computing them explicitly, its attention weights ('attention')
  when the 'intermediates' collection is mutable. Returns `(x, None)`, or with `return_logits`
  `(x, attention logits)`; `attention_bias` is added to the attention logits (see
  `MultiHeadDotProductAttention`).
  """

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  use_drop_path: bool = False
  deterministic: bool = True
  attention_impl: str = 'auto'
  return_logits: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, drop_rate, attention_bias=None):
    norm = lambda name: nn.LayerNorm(
      epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    skip_drop_path = self.deterministic or not self.use_drop_path
    collect = self.is_mutable_collection(common.INTERMEDIATES)

    y = norm('LayerNorm_0')(x)
    y, weights = MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dropout_rate=self.attention_dropout_rate,
      deterministic=self.deterministic,
      return_weights=collect,
      return_logits=self.return_logits,
      implementation=self.attention_impl,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      matmul_dtype=self.matmul_dtype,
      name='MultiHeadDotProductAttention_1',
    )(y, logits_bias=attention_bias)
    logits = weights if self.return_logits else None
    if collect:
      if self.return_logits:
        weights = softmax(logits).astype(self.dtype)
      self.sow(common.INTERMEDIATES, 'attention', weights)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=self.deterministic)
    x = x + common.drop_path(self, y, drop_rate, skip_drop_path)

    y = norm('LayerNorm_2')(x)
    mlp = _vit_mlp(
      self.mlp_dim,
      self.dropout_rate,
      self.dtype,
      self.param_dtype,
      self.matmul_dtype,
      name='MlpBlock_3',
    )
    y = mlp(y, deterministic=self.deterministic)
    x = x + common.drop_path(self, y, drop_rate, skip_drop_path)
    self.sow(common.INTERMEDIATES, 'blocks', x)
    return x, logits


class Encoder(nn.Module):
  """Position embedding, dropout, the blocks and the final LayerNorm.

  `attention_bias` (layers, B, heads, T, T): added to each block's attention logits. With
  `return_logits` it returns `(x, logits)`, every block's attention logits (layers, B, heads, T,
  T), else `x`.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  attention_impl: str = 'auto'
  remat: bool = False
  remat_policy: str = 'nothing'
  scan: bool = False
  return_logits: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, *, train: bool, attention_bias=None):
    x = AddPositionEmbs(param_dtype=self.param_dtype, name='posembed_input')(x)
    x = x.astype(self.dtype)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x, logits = common.layer_stack(
      EncoderBlock,
      x,
      num_layers=self.num_layers,
      name='encoderblock',
      scan=self.scan,
      remat=self.remat,
      remat_policy=self.remat_policy,
      per_layer=attention_bias,
      outputs=True,
      return_logits=self.return_logits,
      stochastic_depth=self.stochastic_depth,
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      use_drop_path=self.stochastic_depth > 0,
      deterministic=not train,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      matmul_dtype=self.matmul_dtype,
    )
    x = nn.LayerNorm(
      epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name='encoder_norm'
    )(x)
    return (x, logits) if self.return_logits else x


class AddPositionEmbs(nn.Module):
  """Learned position embedding (1, tokens, D), BERT-style N(0, 0.02) init."""

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (1, x.shape[1], x.shape[2])
    try:
      pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
    except flax.errors.ScopeParamShapeError as e:
      raise ValueError(
        f'The input gives {x.shape[1]} tokens but the position embedding was made for a '
        f'different count ({e}). Feed images of the resolution the parameters were made for, '
        'or adapt them with mixer_vit.models.load_pretrained (which resizes the grid).'
      ) from e
    return x + pe.astype(x.dtype)


class MAPHead(nn.Module):
  """Multi-head attention pooling with a learned probe (big_vision names)."""

  num_heads: int
  mlp_dim: int
  attention_impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    probe = self.param(
      'probe', nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]), self.param_dtype
    )
    probe = jnp.tile(probe.astype(x.dtype), [x.shape[0], 1, 1])
    y, _ = MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      implementation=self.attention_impl,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      matmul_dtype=self.matmul_dtype,
      name='MultiHeadDotProductAttention_0',
    )(probe, x)
    z = nn.LayerNorm(
      epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name='LayerNorm_0'
    )(y)
    mlp = _vit_mlp(
      self.mlp_dim, 0.0, self.dtype, self.param_dtype, self.matmul_dtype, name='MlpBlock_0'
    )
    y = y + mlp(z)
    return y[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier; `resnet` set makes it an R+ViT hybrid.

  Call as `apply({'params': p}, images, train=bool)` with images (B, H, W, 3) in [-1, 1].
  Returns float32 logits (B, num_classes), or (B, tokens, num_classes) for the 'unpooled'
  classifiers. `models.apply_with_intermediates` also returns the blocks' outputs and attention
  weights.

  For the Dynamic ViT cascade (`models.dvt`), whose stages are these models: `token_bias`
  (B, tokens, D) is added to the tokens (class token included) before the position embedding,
  `attention_bias` (layers, B, heads, tokens, tokens) to each block's attention logits, and
  `return_reuse` returns `(logits, encoded tokens, attention logits of every block)`.
  """

  num_classes: int | None
  patches: Mapping[str, Any]  # {'size': (ph, pw)}
  hidden_size: int
  transformer: Mapping[str, Any]  # {'num_layers': ..., 'mlp_dim': ..., 'num_heads': ...}
  resnet: Mapping[str, Any] | None = None  # {'num_layers': (3, 4, 9), 'width_factor': 1.0}
  classifier: str = 'token'
  representation_size: int | None = None
  head_bias_init: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  attention_impl: str = 'auto'
  remat: bool = False
  remat_policy: str = 'nothing'
  scan: bool = False
  dtype: Dtype = 'float32'
  param_dtype: Dtype = 'float32'
  matmul_dtype: Dtype | None = None

  def __post_init__(self):
    common.freeze_fields(self, 'patches', 'transformer', 'resnet')
    super().__post_init__()

  def _check_options(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'Unknown classifier {self.classifier!r}; choose one of {CLASSIFIERS}.')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
        f'Unknown attention_impl {self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.'
      )

  @nn.compact
  def __call__(
    self,
    images,
    *,
    train: bool = False,
    token_bias=None,
    attention_bias=None,
    return_reuse: bool = False,
  ):
    self._check_options()
    common.check_images(images, 'VisionTransformer')
    dtype, param_dtype = common.to_dtype(self.dtype), common.to_dtype(self.param_dtype)
    matmul_dtype = precision.to_matmul_dtype(self.matmul_dtype)
    patch = sizes.pair(self.patches['size'], 'patches.size')
    x = images
    if self.resnet is not None:
      x = resnet.resnet_stem(
        x,
        num_layers=tuple(self.resnet['num_layers']),
        width_factor=self.resnet.get('width_factor', 1.0),
        root=self.resnet.get('root', resnet.DEFAULT_ROOT),
        num_groups=self.resnet.get('num_groups', resnet.DEFAULT_NUM_GROUPS),
        dtype=dtype,
        param_dtype=param_dtype,
        matmul_dtype=matmul_dtype,
      )

    x = nn.Conv(
      self.hidden_size,
      patch,
      strides=patch,
      padding='VALID',
      dtype=dtype,
      param_dtype=param_dtype,
      name='embedding',
      **precision.matmul_kwargs(matmul_dtype, conv=True),
    )(x)
    n, h, w, c = x.shape
    if h * w == 0:
      raise ValueError(f'Images of shape {images.shape} are smaller than one patch ({patch}).')
    x = jnp.reshape(x, (n, h * w, c))

    if self.classifier in ('token', 'token_unpooled'):
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c), param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], 1)
    if token_bias is not None:
      x = x + token_bias.astype(x.dtype)

    x = Encoder(
      num_layers=self.transformer['num_layers'],
      mlp_dim=self.transformer['mlp_dim'],
      num_heads=self.transformer['num_heads'],
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      stochastic_depth=self.stochastic_depth,
      attention_impl=self.attention_impl,
      remat=self.remat,
      remat_policy=self.remat_policy,
      scan=self.scan,
      return_logits=return_reuse,
      dtype=dtype,
      param_dtype=param_dtype,
      matmul_dtype=matmul_dtype,
      name='Transformer',
    )(x, train=train, attention_bias=attention_bias)
    if return_reuse:
      x, attention_logits = x
    encoded = x
    self.sow(common.INTERMEDIATES, 'encoded', x)

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    elif self.classifier == 'map':
      x = MAPHead(
        num_heads=self.transformer['num_heads'],
        mlp_dim=self.transformer['mlp_dim'],
        attention_impl=self.attention_impl,
        dtype=dtype,
        param_dtype=param_dtype,
        matmul_dtype=matmul_dtype,
        name='MAPHead_0',
      )(x)
    # 'unpooled' / 'token_unpooled' keep every token.

    x = x.astype(jnp.float32)
    if self.representation_size is not None:
      x = nn.Dense(
        self.representation_size, dtype=jnp.float32, param_dtype=param_dtype, name='pre_logits'
      )(x)
      x = jnp.tanh(x)
    self.sow(common.INTERMEDIATES, common.HEAD_INPUT, x)

    if self.num_classes:
      x = common.classifier_head(x, self.num_classes, self.head_bias_init, param_dtype)
    if return_reuse:
      return x, encoded, attention_logits
    return x


Model = VisionTransformer


# ------------------------------------------------------------------------------------------------
# Checkpoints: adapting parameter files to this model (see models.load_pretrained / load_params).

Params = dict[str, Any]

# Encoder blocks numbered per class as linen does (vit_jax after convert_pre_linen) -> file names.
_LINEN_BLOCK_NAMES = {
  'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
  'LayerNorm_1': 'LayerNorm_2',
  'MlpBlock_0': 'MlpBlock_3',
}
_ENCODER_BLOCK = re.compile(r'^encoderblock_\d+$')
# Parts after the encoder that load_pretrained keeps only when the new model has them in the
# same shapes (the head itself is always the new model's).
_POOLING_PARTS = ('pre_logits', 'MAPHead_0')

LOAD_HINTS = {
  'pre_logits/': 'the checkpoint has a pre_logits layer; set representation_size to its width '
  'to keep it (or use load_pretrained, which drops it when the config has none).',
  'Transformer/posembed_input/': 'position embeddings follow the image size; load_pretrained '
  'resizes them.',
}


def fix_legacy(params: Mapping) -> Params:
  """Adapts older file variants to the current layout.

  - Encoder blocks numbered per class as linen does (`LayerNorm_1`,
    `MultiHeadDotProductAttention_0`, `MlpBlock_0`) get the names of the released files
    (`LayerNorm_2`, `MultiHeadDotProductAttention_1`, `MlpBlock_3`).
  - Hybrids: GroupNorm scale/bias of old files, shaped (1, 1, 1, C), become (C,).
  """

  def rename(tree: Mapping) -> Params:
    out = {}
    for key, value in tree.items():
      if isinstance(value, Mapping):
        value = rename(value)
        if _ENCODER_BLOCK.match(key) and 'MlpBlock_0' in value and 'MlpBlock_3' not in value:
          value = {_LINEN_BLOCK_NAMES.get(k, k): v for k, v in value.items()}
      out[key] = value
    return out

  return resnet.fix_group_norm(rename(params))


def num_grid_tokens(params: Mapping) -> int | None:
  """Patch tokens the position embeddings were made for (class token not counted)."""
  try:
    count = params_io.shape(params['Transformer']['posembed_input']['pos_embedding'])[1]
  except KeyError:
    return None
  return count - (1 if 'cls' in params else 0)


def _grid_of(num_tokens: int, config: Any) -> tuple[int, int] | None:
  """Token grid with `num_tokens` cells: the config's image size's, else square."""
  grid = geometry.token_grid(config)
  if grid[0] * grid[1] == num_tokens:
    return grid
  side = int(round(np.sqrt(num_tokens)))
  if side * side == num_tokens:
    return side, side
  return None


def _interp_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Linear interpolation along `axis` with corners aligned (like scipy.ndimage.zoom(order=1)),
  so linear ramps stay exactly linear."""
  old = x.shape[axis]
  if old == size:
    return x
  if old == 1:
    return np.repeat(x, size, axis=axis)
  pos = np.linspace(0.0, old - 1.0, size) if size > 1 else np.zeros(1)
  lo = np.clip(np.floor(pos).astype(int), 0, old - 2)
  frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  a = np.take(x, lo, axis=axis)
  b = np.take(x, lo + 1, axis=axis)
  return a * (1.0 - frac) + b * frac


def resize_posemb_grid(grid: np.ndarray, new_shape: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a (rows, cols, D) position-embedding grid."""
  dtype = grid.dtype
  out = grid.astype(np.float64)
  out = _interp_axis(out, 0, new_shape[0])
  out = _interp_axis(out, 1, new_shape[1])
  return out.astype(dtype)


def resize_posemb(
  posemb: np.ndarray,
  old_grid: tuple[int, int],
  new_grid: tuple[int, int],
  num_extra_tokens: int,
) -> np.ndarray:
  """Resizes (1, extra + rows*cols, D) embeddings; extra (class) tokens kept."""
  posemb = np.asarray(posemb)
  extra, grid = posemb[:, :num_extra_tokens], posemb[0, num_extra_tokens:]
  if grid.shape[0] != old_grid[0] * old_grid[1]:
    raise ValueError(f'{grid.shape[0]} grid tokens do not form a {old_grid} grid.')
  grid = grid.reshape(old_grid[0], old_grid[1], -1)
  grid = resize_posemb_grid(grid, new_grid).reshape(1, -1, posemb.shape[-1])
  return np.concatenate([extra, grid.astype(posemb.dtype)], axis=1)


def _resize_posemb_in_tree(
  restored: Params, expected: Mapping, config: Any, source_grid: tuple[int, int] | None
) -> None:
  try:
    want = params_io.shape(expected['Transformer']['posembed_input']['pos_embedding'])
  except KeyError:
    return
  posemb = restored.get('Transformer', {}).get('posembed_input', {}).get('pos_embedding')
  if posemb is None or params_io.shape(posemb) == want:
    return
  have = params_io.shape(posemb)
  if len(have) != 3 or have[2] != want[2]:
    return  # Reported as a shape mismatch by verify_tree.
  extra = 1 if 'cls' in expected else 0
  new_grid = _grid_of(want[1] - extra, config)
  old_count = have[1] - extra
  old_grid = tuple(source_grid) if source_grid else _grid_of(old_count, config)
  if new_grid is None:
    raise ValueError(
      f'The model has {want[1] - extra} position embeddings, which is neither the token grid '
      f'of config.image_size={tuple(config.image_size)} nor square. Set image_size in the model '
      'config to the resolution the parameters were initialised for.'
    )
  if old_grid is None or old_grid[0] * old_grid[1] != old_count:
    raise ValueError(
      f'The checkpoint has {old_count} grid position embeddings, which do not form a square '
      'grid; pass source_grid=(rows, cols).'
    )
  logging.info('Resizing position embeddings from grid %s to %s.', old_grid, new_grid)
  restored['Transformer']['posembed_input']['pos_embedding'] = resize_posemb(
    posemb, old_grid, new_grid, extra
  )


def adapt_pretrained(
  restored: Params,
  expected: Mapping,
  config: Any,
  source_grid: tuple[int, int] | None = None,
) -> None:
  """Fits a pretrained tree (in place) to the model whose per-layer params are `expected`.

  pre_logits and the MAP pooling head are dropped when the model has none and freshly
  initialised (taken from `expected`) when the checkpoint has none of the same shapes; position
  embeddings are resized bilinearly to the model's grid (class token kept). The checkpoint's
  grid is `source_grid` when given, else the config's or a square one.
  """
  for name in _POOLING_PARTS:
    if name in restored and name not in expected:
      logging.info('load_pretrained: dropping %s of the checkpoint.', name)
      del restored[name]
    elif name in expected:
      old = {k: params_io.shape(v) for k, v in params_io.flatten(restored.get(name, {})).items()}
      new = {k: params_io.shape(v) for k, v in params_io.flatten(expected[name]).items()}
      if old != new:
        logging.info('load_pretrained: freshly initialised %s.', name)
        restored[name] = dict(expected[name])
  _resize_posemb_in_tree(restored, expected, config, source_grid)
