"""BiT-style ResNet v1.5: the stem of the R+ViT hybrids, and the pure ResNet classifier family.

Weight-standardised convolutions followed by GroupNorm (32 groups in the released
hybrids; `num_groups` for narrow stems), bottleneck units. Module names (`conv_root`,
`gn_root`, `block1/unit1/conv1`, `gn1`, ..., `conv_proj`, `gn_proj`) are those of the
released hybrid checkpoints; `fix_group_norm` adapts the GroupNorm shapes of older hybrid files.

The `resnet` model family (`ResNet`, registry names `ResNet-S`, `testing-resnet`) is that stem
with a classifier: global average pooling of the last stage and a zero-initialised `head`. Its
parameter tree is the hybrid stem's plus the head:
`conv_root/kernel`, `gn_root/{scale,bias}`, `block<s>/unit<u>/{conv1,conv2,conv3,conv_proj}/kernel`,
`block<s>/unit<u>/{gn1,gn2,gn3,gn_proj}/{scale,bias}`, `head/{kernel,bias}` (stages and units
numbered from 1, as in the released BiT and hybrid files). Config keys: `resnet` =
{`num_layers`: units per stage, `width_factor`, `root` (`ROOTS`), `num_groups`}, `num_classes`,
`head_bias_init`, `dropout_rate` (before the head), `dtype`, `param_dtype`, `matmul_dtype`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import re
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from mixer_vit.models import common
from mixer_vit.models import precision

Dtype = Any

# Numerics of the released hybrids: weights standardised with eps added to the
# standard deviation; flax GroupNorm defaults (32 groups, eps 1e-6).
WS_EPSILON = 1e-5
DEFAULT_NUM_GROUPS = 32


def standardize(w: jax.Array, axis=(0, 1, 2), eps: float = WS_EPSILON):
  """Zero mean, unit standard deviation per output channel (HWIO kernels)."""
  w = w - jnp.mean(w, axis=axis, keepdims=True)
  return w / (jnp.std(w, axis=axis, keepdims=True) + eps)


class StdConv(nn.Module):
  """Bias-free 'SAME' convolution with weight standardisation."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      'kernel',
      nn.initializers.lecun_normal(),
      (*self.kernel_size, x.shape[-1], self.features),
      self.param_dtype,
    )
    kernel = standardize(kernel.astype(jnp.float32)).astype(self.dtype)
    conv = (
      precision.mixed_conv(self.matmul_dtype) if self.matmul_dtype else lax.conv_general_dilated
    )
    return conv(
      x.astype(self.dtype),
      kernel,
      window_strides=self.strides,
      padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )


def group_norm(name, dtype, param_dtype, num_groups, **kw):
  """The BiT units' GroupNorm (epsilon 1e-6), shared by ResNet and AlterNet units."""
  return nn.GroupNorm(
    num_groups=num_groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name, **kw
  )


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (4x wider), projection."""

  features: int
  strides: tuple[int, int] = (1, 1)
  num_groups: int = DEFAULT_NUM_GROUPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: StdConv(  # noqa: E731
      f,
      k,
      s,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      matmul_dtype=self.matmul_dtype,
      name=name,
    )
    gn = lambda name, **kw: group_norm(  # noqa: E731
      name, self.dtype, self.param_dtype, self.num_groups, **kw
    )

    residual = x
    if x.shape[-1] != 4 * self.features or self.strides != (1, 1):
      residual = conv(4 * self.features, (1, 1), self.strides, 'conv_proj')(x)
      residual = gn('gn_proj')(residual)

    y = nn.relu(gn('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(gn('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    y = gn('gn3', scale_init=nn.initializers.zeros)(
      conv(4 * self.features, (1, 1), (1, 1), 'conv3')(y)
    )
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`num_units` bottleneck units; only the first one may downsample."""

  num_units: int
  features: int
  first_stride: tuple[int, int]
  num_groups: int = DEFAULT_NUM_GROUPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_units):
      x = ResidualUnit(
        self.features,
        self.first_stride if i == 0 else (1, 1),
        num_groups=self.num_groups,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        matmul_dtype=self.matmul_dtype,
        name=f'unit{i + 1}',
      )(x)
    return x


# Root blocks: (kernel, stride, 3x3 stride-2 max-pool after it). 'conv7_pool' is the released
# hybrids' (4x down-sampling); the 3x3 ones keep more of a small image (CIFAR, MNIST) for the stages:
# 'conv3_pool' halves it, 'conv3' keeps its resolution (slow: the first stage then runs at full size).
ROOTS = {'conv7_pool': (7, 2, True), 'conv3_pool': (3, 1, True), 'conv3': (3, 1, False)}
DEFAULT_ROOT = 'conv7_pool'


def _root(root: str) -> tuple[int, int, bool]:
  if root not in ROOTS:
    raise ValueError(f'Unknown resnet root {root!r}; choose one of {sorted(ROOTS)}.')
  return ROOTS[root]


def root_block(
  x,
  *,
  width_factor: float,
  root: str,
  num_groups: int,
  dtype: Dtype,
  param_dtype: Dtype,
  matmul_dtype: Dtype | None = None,
):
  """`conv_root`, `gn_root`, ReLU (and the max-pool of `ROOTS`) in the caller's scope; returns
  the output and the root's width (64 x width_factor), that of the first stage's bottlenecks."""
  kernel, stride, pool = _root(root)
  width = int(64 * width_factor)
  _check_num_groups(num_groups, width)
  x = StdConv(
    width,
    (kernel, kernel),
    (stride, stride),
    dtype=dtype,
    param_dtype=param_dtype,
    matmul_dtype=matmul_dtype,
    name='conv_root',
  )(x)
  x = nn.relu(group_norm('gn_root', dtype, param_dtype, num_groups)(x))
  if pool:
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  return x, width


def resnet_stem(
  x,
  *,
  num_layers: Sequence[int],
  width_factor: float,
  root: str = DEFAULT_ROOT,
  num_groups: int = DEFAULT_NUM_GROUPS,
  dtype: Dtype,
  param_dtype: Dtype,
  matmul_dtype: Dtype | None = None,
):
  """Root block (`ROOTS`) + stages; call inside the parent's compact method.

  The modules are created in the caller's scope so the parameters sit at the
  top level of the model (`conv_root`, `gn_root`, `block1`, ...), as in the
  released checkpoints.
  """
  x, width = root_block(
    x,
    width_factor=width_factor,
    root=root,
    num_groups=num_groups,
    dtype=dtype,
    param_dtype=param_dtype,
    matmul_dtype=matmul_dtype,
  )
  for i, num_units in enumerate(num_layers):
    x = ResNetStage(
      num_units,
      width * 2**i,
      (1, 1) if i == 0 else (2, 2),
      num_groups=num_groups,
      dtype=dtype,
      param_dtype=param_dtype,
      matmul_dtype=matmul_dtype,
      name=f'block{i + 1}',
    )(x)
  return x


def _check_num_groups(num_groups: int, width: int) -> None:
  """Every GroupNorm of the stem splits its channels (multiples of the root's `width`) evenly."""
  if num_groups < 1 or width % num_groups:
    raise ValueError(
      f'resnet.num_groups={num_groups} must divide the root width {width} (64 x width_factor); '
      f'pick a divisor of {width}, or a larger width_factor.'
    )


def _halvings(num_layers: Sequence[int], root: str) -> int:
  _, stride, pool = _root(root)
  return (stride == 2) + pool + max(len(num_layers) - 1, 0)


def stem_stride(num_layers: Sequence[int], root: str = DEFAULT_ROOT) -> int:
  """Total downsampling of `resnet_stem` (the root's, then 2x per stage after the first)."""
  return 2 ** _halvings(num_layers, root)


def stem_output_size(size: int, num_layers: Sequence[int], root: str = DEFAULT_ROOT) -> int:
  """Spatial size after `resnet_stem` ('SAME' padding rounds up)."""
  for _ in range(_halvings(num_layers, root)):
    size = -(-size // 2)
  return size


def stem_macs(
  image_size: tuple[int, int],
  num_layers: Sequence[int],
  width_factor: float = 1.0,
  root: str = DEFAULT_ROOT,
) -> tuple[int, tuple[int, int], int]:
  """Multiply-adds of `resnet_stem`'s convolutions on one (H, W) image, with the (H, W) and the
  channels of its output (what `models.flops` counts for hybrids and ResNets)."""
  kernel, stride, pool = _root(root)
  width = int(64 * width_factor)
  h, w = -(-image_size[0] // stride), -(-image_size[1] // stride)
  macs = h * w * kernel * kernel * 3 * width
  if pool:
    h, w = -(-h // 2), -(-w // 2)
  channels = width
  for i, num_units in enumerate(num_layers):
    features = width * 2**i
    for u in range(num_units):
      s = 2 if i > 0 and u == 0 else 1
      out_h, out_w = -(-h // s), -(-w // s)
      macs += h * w * channels * features  # conv1 (1x1).
      macs += out_h * out_w * 9 * features * features  # conv2 (3x3, the unit's stride).
      macs += out_h * out_w * features * 4 * features  # conv3 (1x1).
      if channels != 4 * features or s != 1:
        macs += out_h * out_w * channels * 4 * features  # conv_proj.
      h, w, channels = out_h, out_w, 4 * features
  return macs, (h, w), channels


# GroupNorm modules of the stem: `gn_root`, `gn1`..`gn3`, `gn_proj`.
_GROUP_NORM = re.compile(r'^gn(\d+|_root|_proj)$')


def fix_group_norm(params: Mapping) -> dict[str, Any]:
  """GroupNorm scale/bias of older hybrid checkpoints, shaped (1, 1, 1, C), become (C,)."""

  def fix(tree: Mapping, parent: str) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
      if isinstance(value, Mapping):
        out[key] = fix(value, key)
      elif _GROUP_NORM.match(parent) and key in ('scale', 'bias'):
        out[key] = np.reshape(value, (-1,))
      else:
        out[key] = value
    return out

  return fix(params, '')


# ------------------------------------------------------------------------------------------------
# The `resnet` family: a ResNet classifier.


class ResNet(nn.Module):
  """BiT-style ResNet v1.5 classifier: `resnet_stem`, global average pooling, `head`.

  Call as `apply({'params': p}, images, train=bool)` with images (B, H, W, 3) in [-1, 1];
  returns float32 logits (B, num_classes). The fields `stochastic_depth`, `remat`,
  `remat_policy` and `scan` exist so that the shared config keys pass through; the registry
  refuses them set (`validate_config`).
  """

  num_classes: int | None
  resnet: Mapping[str, Any]  # {'num_layers': (2, 2, 2), 'width_factor': 0.5, 'root', 'num_groups'}
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
    common.freeze_fields(self, 'resnet')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    common.check_images(images, 'ResNet')
    dtype, param_dtype = common.to_dtype(self.dtype), common.to_dtype(self.param_dtype)
    x = resnet_stem(
      images,
      num_layers=tuple(self.resnet['num_layers']),
      width_factor=self.resnet.get('width_factor', 1.0),
      root=self.resnet.get('root', DEFAULT_ROOT),
      num_groups=self.resnet.get('num_groups', DEFAULT_NUM_GROUPS),
      dtype=dtype,
      param_dtype=param_dtype,
      matmul_dtype=precision.to_matmul_dtype(self.matmul_dtype),
    )
    return classify(self, x, train, param_dtype)


def classify(module: nn.Module, x, train: bool, param_dtype: Dtype):
  """Global average pooling, dropout and the zero-initialised `head` (call in a compact method);
  sows the pooled features as the head's input."""
  x = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
  x = nn.Dropout(rate=module.dropout_rate)(x, deterministic=not train)
  module.sow(common.INTERMEDIATES, common.HEAD_INPUT, x)
  if module.num_classes:
    x = common.classifier_head(x, module.num_classes, module.head_bias_init, param_dtype)
  return x


Model = ResNet

# Checkpoints (see models.load_pretrained / load_params): the stem's names are the released
# hybrids', so a hybrid's `conv_root` / `block<i>` weights load by name (`config.frozen` etc.).
LOAD_HINTS = {
  'block': 'ResNet units follow config resnet.num_layers and width_factor; use the ones the '
  'checkpoint was trained with.',
}


def fix_legacy(params: Mapping) -> dict[str, Any]:
  """GroupNorm scale/bias of older BiT-style files, shaped (1, 1, 1, C), become (C,)."""
  return fix_group_norm(params)


def num_grid_tokens(params: Mapping) -> int | None:
  """A convolutional network has no fixed token grid: None (any resolution)."""
  del params
  return None


def adapt_pretrained(
  restored: dict[str, Any],
  expected: Mapping,
  config: Any,
  source_grid: tuple[int, int] | None = None,
) -> None:
  """Nothing beyond the new head: convolutions fit every resolution."""
  del restored, expected, config, source_grid
