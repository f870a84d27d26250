"""Mixed precision: matrix multiplies with half-precision operands and float32 accumulation.

`model.matmul_dtype='bfloat16'` routes every dense layer, convolution and attention product of
the models through these functions (flax's `dot_general=` / `conv_general_dilated=` hooks):
operands are cast to bfloat16, products accumulate and come out in float32, so biases,
LayerNorm, softmax, GELU, residual adds, the loss and the optimiser stay float32 and the
parameters are float32 as before. The backward products run on bfloat16 operands as well (the
incoming gradient is cast), which is where most of a training step's multiplies are.
`model.dtype='bfloat16'` is the other, older switch: every activation in bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import importlib.metadata
import math
import os
import re
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from mixer_vit.runtime import env

# The configs' `precision` argument (configs/pretrain.py, configs/augreg.py): what it sets.
PRECISIONS = {
  'float32': ('float32', None),
  'bfloat16': ('bfloat16', None),  # model.dtype: every activation in bfloat16.
  'mixed': ('float32', 'bfloat16'),  # matmul_dtype: bfloat16 products, float32 everything else.
}


def accelerator_platform() -> str:
  """'cpu', 'tpu', 'cuda' or 'rocm' (jax's 'gpu' backend split by its runtime): what the attention
  implementation and the configs' precision choice depend on."""
  backend = jax.default_backend()
  if backend != 'gpu':
    return backend
  version = str(getattr(jax.devices()[0].client, 'platform_version', '')).lower()
  return 'rocm' if 'rocm' in version or 'hip' in version else 'cuda'


# Installed jax plugins that make an accelerator jax's default platform.
_PLUGINS = (
  ('libtpu', 'tpu'),
  ('libtpu-nightly', 'tpu'),
  ('jax-cuda13-plugin', 'cuda'),
  ('jax-cuda12-plugin', 'cuda'),
  ('jax-rocm7-plugin', 'rocm'),
  ('jax-rocm60-plugin', 'rocm'),
)


def installed_platform() -> str:
  """The platform jax will run on, found without starting its backends: a config is read before
  ``jax.distributed.initialize`` (multi-host runs), which must come before any backend starts.
  ``JAX_PLATFORMS``'s first entry when set, else the accelerator whose jax plugin is installed,
  else 'cpu'."""
  chosen = os.environ.get('JAX_PLATFORMS', '').split(',')[0].strip().lower()
  if chosen:
    return {'gpu': 'cuda'}.get(chosen, chosen)
  for distribution, platform in _PLUGINS:
    try:
      importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
      continue
    return platform
  return 'cpu'


def resolve_precision(
  precision: str, cpu_half: bool, platform: str | None = None
) -> tuple[str, str | None]:
  """`(config.dtype, config.matmul_dtype)` for a config's `precision` argument.

  'float32', 'bfloat16' (`dtype`: every activation in bfloat16) and 'mixed' (`matmul_dtype`:
  bfloat16 products with float32 sums, everything else float32) are taken as they are. 'auto'
  is the fastest measured on this machine's `platform` (default: `installed_platform()`, which
  starts no backend):
  on a GPU or TPU 'bfloat16' (one H200, ViT-B/16 training step, batch 256: 2,612-2,663 images/s
  against 2,250 mixed and 1,316 float32); on a CPU 'mixed' for recipes that train in half
  precision (`cpu_half`: the CPU's bfloat16 products, float32 elsewhere, where bfloat16
  activations are emulated and slower), else 'float32'.
  """
  if precision == 'auto':
    platform = platform or installed_platform()
    if platform != 'cpu':
      precision = 'bfloat16'
    else:
      precision = 'mixed' if cpu_half else 'float32'
  if precision not in PRECISIONS:
    raise ValueError(
      f"precision={precision!r}: use one of {['auto', *PRECISIONS]} ('auto': bfloat16 on a GPU "
      'or TPU, mixed or float32 on a CPU).'
    )
  return PRECISIONS[precision]


def to_matmul_dtype(name_or_dtype: Any) -> np.dtype | None:
  """`model.matmul_dtype`: None (or 'float32') keeps the layers' dtype; else a half dtype."""
  if name_or_dtype is None:
    return None
  try:
    dtype = jnp.dtype(name_or_dtype)
  except TypeError:
    dtype = None
  if dtype == np.float32:
    return None
  if dtype is None or dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"matmul_dtype must be None, 'bfloat16' or 'float16', got {name_or_dtype!r}.")
  return dtype


def _free_dims(ndim: int, contracting: Sequence[int], batch: Sequence[int]) -> list[int]:
  return [d for d in range(ndim) if d not in contracting and d not in batch]


@functools.cache
def cpu_multiplies_bfloat16() -> bool:
  """Whether this CPU has bfloat16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16).

  XLA's CPU matrix-multiply fusions (YNNPACK) then run bfloat16 products with float32 sums at up
  to about twice the float32 rate; without them bfloat16 is emulated and slower than float32.
  ``MIXER_VIT_CPU_BFLOAT16=0`` or ``=1`` overrides the detection (``/proc/cpuinfo``, Linux only).
  """
  forced = env.flag('MIXER_VIT_CPU_BFLOAT16', None)
  if forced is not None:
    return forced
  try:
    with open('/proc/cpuinfo') as f:
      flags = f.read()
  except OSError:
    return False
  return re.search(r'\b(avx512_bf16|amx_bf16)\b', flags) is not None


def _native_on_cpu(compute_dtype) -> bool:
  return compute_dtype == jnp.bfloat16 and cpu_multiplies_bfloat16()


def _operands(lhs, rhs, compute_dtype):
  """Both operands rounded to `compute_dtype`; on CPUs without its arithmetic widened back.

  Rounding then widening gives the same numbers as a half-precision multiply with float32 sums
  (widening is exact), at float32 speed, where half precision would only be emulated.
  """
  lhs, rhs = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
  if jax.default_backend() == 'cpu' and not _native_on_cpu(compute_dtype):
    return lhs.astype(jnp.float32), rhs.astype(jnp.float32)
  return lhs, rhs


def _moved_bytes(x, perm) -> int:
  """Bytes `lax.transpose(x, perm)` copies: none when it only moves dimensions of size one."""
  kept = [d for d in perm if x.shape[d] != 1]
  return 0 if kept == sorted(kept) else x.size * x.dtype.itemsize


def canonical_dot(lhs, rhs, dims, move_rhs_on_ties: bool = False):
  """`lax.dot_general(lhs, rhs, dims)` (float32 result) as one (b, m, k) x (b, k, n) product.

  XLA's CPU runtime multiplies bfloat16 into float32 only inside its YNNPACK fusions, which take
  a row-major (m, k) left and (k, n) right operand; a product it leaves unfused fails ('Unsupported
  element type for DotThunk::Execute: BF16 x BF16 = F32', jaxlib 0.10.2). The backward products
  contract over other axes, so the operands are transposed into that layout here and the
  optimisation barriers keep XLA from folding the transposes (of operands or result) back in.
  Where that would copy more, the transposed product (b, n, k) x (b, k, m) runs instead and its
  float32 result is transposed: a weight gradient then copies the narrower of its two operands
  (an MLP's input rather than its 4x wider hidden gradient), attention's key gradient the
  (tokens, head) queries rather than the (tokens, tokens) scores. `move_rhs_on_ties`: where both
  plans copy operands of the same size, move `rhs` (weight gradients pass the layer's input there:
  query, key and value read one LayerNorm output, and XLA merges identical transposes of it).
  """
  (lc, rc), (lb, rb) = dims
  lhs_free, rhs_free = _free_dims(lhs.ndim, lc, lb), _free_dims(rhs.ndim, rc, rb)
  size = lambda x, axes: math.prod(x.shape[d] for d in axes)
  b, m, k, n = size(lhs, lb), size(lhs, lhs_free), size(lhs, lc), size(rhs, rhs_free)
  out_shape = [lhs.shape[d] for d in (*lb, *lhs_free)] + [rhs.shape[d] for d in rhs_free]
  direct = ((*lb, *lhs_free, *lc), (*rb, *rc, *rhs_free))
  swapped = ((*rb, *rhs_free, *rc), (*lb, *lc, *lhs_free))
  cost = lambda perms, first, second: _moved_bytes(first, perms[0]) + _moved_bytes(second, perms[1])
  swapped_cost, direct_cost = cost(swapped, rhs, lhs), cost(direct, lhs, rhs)
  result_copy = b * n * m * 4 if min(n, m) > 1 else 0
  swap = swapped_cost + result_copy < direct_cost or (
    move_rhs_on_ties and swapped_cost == direct_cost and _moved_bytes(rhs, swapped[0]) > 0
  )
  first, second, perms, rows, cols = (rhs, lhs, swapped, n, m) if swap else (lhs, rhs, direct, m, n)
  left = lax.transpose(first, perms[0]).reshape(b, rows, k)
  right = lax.transpose(second, perms[1]).reshape(b, k, cols)
  left, right = lax.optimization_barrier((left, right))
  out = lax.dot_general(
    left, right, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32
  )
  out = lax.optimization_barrier(out)
  if swap:
    out = lax.transpose(out, (0, 2, 1))
  return out.reshape(out_shape)


def _matmul(lhs, rhs, dims, compute_dtype, move_rhs_on_ties=False):
  lhs, rhs = _operands(lhs, rhs, compute_dtype)
  if jax.default_backend() == 'cpu' and lhs.dtype != jnp.float32:
    return canonical_dot(lhs, rhs, dims, move_rhs_on_ties)
  return lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


def _dot_transpose(g, other, ndim, dims, g_offset, other_is_rhs, out_dtype):
  """Gradient of one operand of `lax.dot_general(lhs, rhs, dims)` given the output's cotangent.

  `g` is laid out as the product is, (batch, lhs free, rhs free); `g_offset` is where the other
  operand's free dimensions start in it. Accumulates in float32.
  """
  (lc, rc), (lb, rb) = dims
  mine_c, other_c = (lc, rc) if other_is_rhs else (rc, lc)
  mine_b, other_b = (lb, rb) if other_is_rhs else (rb, lb)
  other_free = _free_dims(other.ndim, other_c, other_b)
  mine_free = _free_dims(ndim, mine_c, mine_b)
  nb = len(mine_b)
  g_other = tuple(range(g_offset, g_offset + len(other_free)))
  product_dims = ((g_other, tuple(other_free)), (tuple(range(nb)), tuple(other_b)))
  out = _matmul(g, other, product_dims, g.dtype, move_rhs_on_ties=not other_is_rhs)
  # `out` is (batch, my free dims, the other's contracted dims in increasing order): map each
  # back to my dimension and transpose into my layout.
  contracted = sorted(other_c)
  source = list(mine_b) + mine_free + [mine_c[list(other_c).index(d)] for d in contracted]
  return lax.transpose(out, [source.index(d) for d in range(ndim)]).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mixed_dot(lhs, rhs, dims, compute_dtype):
  return _matmul(lhs, rhs, dims, compute_dtype)


def _mixed_dot_fwd(lhs, rhs, dims, compute_dtype):
  lhs_c, rhs_c = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
  out = _matmul(lhs_c, rhs_c, dims, compute_dtype)
  # The backward pass keeps the half-precision operands: half the activation memory too.
  return out, (lhs_c, rhs_c, jnp.zeros((), lhs.dtype), jnp.zeros((), rhs.dtype))


def _mixed_dot_bwd(dims, compute_dtype, residuals, g):
  lhs_c, rhs_c, lhs_dtype, rhs_dtype = residuals
  (lc, _), (lb, _) = dims
  g = g.astype(compute_dtype)
  lhs_free = len(_free_dims(lhs_c.ndim, lc, lb))
  d_lhs = _dot_transpose(g, rhs_c, lhs_c.ndim, dims, len(lb) + lhs_free, True, lhs_dtype.dtype)
  d_rhs = _dot_transpose(g, lhs_c, rhs_c.ndim, dims, len(lb), False, rhs_dtype.dtype)
  return d_lhs, d_rhs


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def mixed_dot_general(compute_dtype: Any) -> Callable[..., jax.Array]:
  """A `lax.dot_general` for `nn.Dense(dot_general=...)`: `compute_dtype` operands, float32 sums.

  Forward and backward multiplies (the cotangent is cast to `compute_dtype` too) all accumulate
  and return float32, so everything around them (biases, norms, softmax, residuals) stays float32.
  """
  compute_dtype = jnp.dtype(compute_dtype)

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
    del precision, preferred_element_type  # Always `compute_dtype` operands, float32 result.
    dims = tuple(tuple(tuple(int(d) for d in side) for side in pair) for pair in dimension_numbers)
    return _mixed_dot(lhs, rhs, dims, compute_dtype)

  return dot_general


# Canonical dimension numbers of an NHWC image and an HWIO kernel (flax's and the stem's layout).
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
# Larger kernels fall back to XLA's convolution: their patch matrices would be huge.
_MAX_MATMUL_TAPS = 49


def conv_as_matmul(lhs, rhs, window_strides, padding, compute_dtype):
  """An NHWC x HWIO convolution as one matrix multiply of its patches with the kernel.

  Non-overlapping windows (kernel == stride, the patch embeddings) are a reshape; others gather
  one strided slice per kernel tap (im2col). The product is `_mixed_dot`'s, so forward and
  backward multiplies run on `compute_dtype` operands with float32 sums.
  """
  kh, kw, cin, cout = rhs.shape
  sh, sw = window_strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
  x = jnp.pad(lhs, ((0, 0), *(tuple(p) for p in padding), (0, 0)))
  oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  if (kh, kw) == (sh, sw):
    x = x[:, : oh * kh, : ow * kw].reshape(x.shape[0], oh, kh, ow, kw, cin)
    patches = x.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], oh, ow, kh * kw * cin)
  else:
    taps = [
      lax.slice(
        x,
        (0, i, j, 0),
        (x.shape[0], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, cin),
        (1, sh, sw, 1),
      )
      for i in range(kh)
      for j in range(kw)
    ]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  kernel = rhs.reshape(kh * kw * cin, cout)
  return _mixed_dot(patches, kernel, (((3,), (0,)), ((), ())), compute_dtype)


def _is_one(value) -> bool:
  return value is None or all(int(v) == 1 for v in np.atleast_1d(value))


def _matmul_conv_applies(
  lhs, rhs, window_strides, padding, dimension_numbers=None, **options
) -> bool:
  """CPU, a plain 2-D NHWC x HWIO convolution (no dilation or groups), a small kernel or patches.

  Kernels as large as their stride (patch embeddings, 16x16 in ViT-B/16) are a reshape, whatever
  their size; other kernels gather one copy of the input per tap, so only small ones qualify.
  """
  if jax.default_backend() != 'cpu' or lhs.ndim != 4 or dimension_numbers is None:
    return False
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC:
    return False
  if isinstance(padding, str) and padding not in ('SAME', 'VALID'):
    return False
  plain = all(
    _is_one(options.get(name))
    for name in ('lhs_dilation', 'rhs_dilation', 'feature_group_count', 'batch_group_count')
  )
  patches = tuple(rhs.shape[:2]) == tuple(int(v) for v in window_strides)
  return plain and (patches or rhs.shape[0] * rhs.shape[1] <= _MAX_MATMUL_TAPS)


def mixed_conv(compute_dtype: Any) -> Callable[..., jax.Array]:
  """A `lax.conv_general_dilated` with `compute_dtype` operands and a float32 result.

  On CPU, plain NHWC convolutions with small kernels run as matrix multiplies of their patches
  (`conv_as_matmul`): XLA's CPU runtime multiplies bfloat16 natively only in its dot fusions, and
  its convolutions' kernel gradients ran up to 10x slower than their forward pass (a BiT stem's
  training step at 32x32, batch 128, took 1.9x the time of the matmul version; Intel Xeon with
  AMX). Elsewhere the backward convolutions run on `compute_dtype` operands and cotangent, their
  results rounded to `compute_dtype` (accumulated in float32 where the backend does, as GPUs and
  TPUs do) before they are cast back to float32.
  """
  compute_dtype = jnp.dtype(compute_dtype)

  def conv(lhs, rhs, window_strides, padding, *args, preferred_element_type=None, **kwargs):
    del preferred_element_type
    if not args and _matmul_conv_applies(lhs, rhs, window_strides, padding, **kwargs):
      return conv_as_matmul(lhs, rhs, tuple(window_strides), padding, compute_dtype)

    def product(a, b):
      a, b = _operands(a, b, compute_dtype)
      return lax.conv_general_dilated(
        a, b, window_strides, padding, *args, preferred_element_type=jnp.float32, **kwargs
      )

    run = jax.custom_vjp(product)

    def fwd(a, b):
      a_c, b_c = a.astype(compute_dtype), b.astype(compute_dtype)
      return run(a, b), (a_c, b_c, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))

    def bwd(residuals, g):
      a_c, b_c, a_dtype, b_dtype = residuals
      # The backward convolutions of a product rounded to `compute_dtype`: half-precision cotangent.
      _, vjp = jax.vjp(lambda a, b: product(a, b).astype(compute_dtype), a_c, b_c)
      d_a, d_b = vjp(g.astype(compute_dtype))
      return d_a.astype(a_dtype.dtype), d_b.astype(b_dtype.dtype)

    run.defvjp(fwd, bwd)
    return run(lhs, rhs)

  return conv


def matmul_kwargs(matmul_dtype: Any, conv: bool = False) -> dict[str, Any]:
  """`nn.Dense` / `nn.DenseGeneral` (or, with `conv`, `nn.Conv`) arguments for `matmul_dtype`.

  None: the layer's own dtype throughout (no extra arguments).
  """
  if matmul_dtype is None:
    return {}
  if conv:
    return {'conv_general_dilated': mixed_conv(matmul_dtype)}
  return {'dot_general': mixed_dot_general(matmul_dtype)}
