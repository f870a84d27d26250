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
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


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


def _operands(lhs, rhs, compute_dtype):
  """Both operands rounded to `compute_dtype`; on CPU then widened back to float32.

  XLA's CPU runtime rejects some half-precision products with float32 results ('Unsupported
  element type for DotThunk::Execute: BF16 x BF16 = F32', jaxlib 0.10.2), and the AVX2 CPUs this
  project is developed on have no bfloat16 arithmetic. Rounding then widening gives the same
  numbers as a half-precision multiply with float32 sums (widening is exact), at float32 speed.
  """
  lhs, rhs = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
  if jax.default_backend() == 'cpu':
    return lhs.astype(jnp.float32), rhs.astype(jnp.float32)
  return lhs, rhs


def _matmul(lhs, rhs, dims, compute_dtype):
  lhs, rhs = _operands(lhs, rhs, compute_dtype)
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
  out = _matmul(
    g, other, ((g_other, tuple(other_free)), (tuple(range(nb)), tuple(other_b))), g.dtype
  )
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


def mixed_conv(compute_dtype: Any) -> Callable[..., jax.Array]:
  """A `lax.conv_general_dilated` with `compute_dtype` operands and a float32 result.

  The backward convolutions run on `compute_dtype` operands and cotangent; their results are
  rounded to `compute_dtype` (accumulated in float32 where the backend does, as GPUs and TPUs do)
  before they are cast back to float32.
  """
  compute_dtype = jnp.dtype(compute_dtype)

  def conv(lhs, rhs, *args, preferred_element_type=None, **kwargs):
    del preferred_element_type

    def product(a, b):
      a, b = _operands(a, b, compute_dtype)
      return lax.conv_general_dilated(a, b, *args, preferred_element_type=jnp.float32, **kwargs)

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
