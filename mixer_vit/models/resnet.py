"""BiT-style ResNet v1.5 stem for the R+ViT hybrids.

Weight-standardised convolutions followed by GroupNorm (32 groups in the released
hybrids; `num_groups` for narrow stems), bottleneck units. Module names (`conv_root`,
`gn_root`, `block1/unit1/conv1`, `gn1`, ..., `conv_proj`, `gn_proj`) are those of the
released hybrid checkpoints; `fix_group_norm` adapts the GroupNorm shapes of older hybrid files.
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


def _group_norm(name, dtype, param_dtype, num_groups, **kw):
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
    gn = lambda name, **kw: _group_norm(  # noqa: E731
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
  x = nn.relu(_group_norm('gn_root', dtype, param_dtype, num_groups)(x))
  if pool:
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
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
