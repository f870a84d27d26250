"""Building blocks shared by ViT and Mixer: MLP block, drop-path, layer stacks.

The layer stack runs either as a Python loop (one parameter subtree per layer,
named `<name>_<i>` as in the released checkpoints) or as one `nn.scan` over
stacked parameters (subtree `<name>` with a leading layer axis), which compiles
deep models much faster. `mixer_vit.checkpoint` converts between the two.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]


def to_dtype(name_or_dtype) -> jnp.dtype:
  """Turns 'bfloat16' / jnp.bfloat16 / np.float32 into a numpy dtype."""
  try:
    return jnp.dtype(name_or_dtype)
  except TypeError as e:
    raise ValueError(
        f"Unknown dtype {name_or_dtype!r}; use e.g. 'float32' or 'bfloat16'."
    ) from e


def drop_path_rates(stochastic_depth: float, num_layers: int) -> np.ndarray:
  """Per-layer drop-path rates rising linearly from 0 to `stochastic_depth`."""
  if num_layers <= 1:
    return np.full((num_layers,), stochastic_depth, np.float32)
  return np.linspace(0.0, stochastic_depth, num_layers, dtype=np.float32)


def drop_path(module: nn.Module, y: jax.Array, rate, deterministic: bool):
  """Drops whole residual branches per example (stochastic depth).

  Kept branches are scaled by 1 / keep so the expectation is unchanged. `rate`
  may be a traced scalar (it is scanned over layers).
  """
  if deterministic:
    return y
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (y.shape[0],) + (1,) * (y.ndim - 1)
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, shape)
  return jnp.where(mask, y / keep.astype(y.dtype), jnp.zeros_like(y))


class MlpBlock(nn.Module):
  """Dense -> GELU (tanh approximation) -> dropout -> Dense -> dropout."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    dense = lambda n: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init)
    out_dim = x.shape[-1]
    x = dense(self.mlp_dim)(x)
    x = nn.gelu(x, approximate=True)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim)(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


def layer_stack(block_cls, x, *, num_layers: int, name: str, scan: bool,
                remat: bool, stochastic_depth: float, **block_kwargs):
  """Applies `num_layers` blocks to `x`; call inside a compact method.

  Each block is called as `block(x, drop_rate) -> (x, per_layer_output)`.

  Returns:
    (x, outputs) where `outputs` has the per-layer outputs stacked on a new
    leading axis (None when the blocks return None).
  """
  rates = drop_path_rates(stochastic_depth, num_layers)
  cls = nn.remat(block_cls, prevent_cse=not scan) if remat else block_cls
  if scan:
    stack = nn.scan(
        cls,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=0,
        length=num_layers)(name=name, **block_kwargs)
    return stack(x, jnp.asarray(rates))
  outputs = []
  for i in range(num_layers):
    x, out = cls(name=f'{name}_{i}', **block_kwargs)(x, float(rates[i]))
    outputs.append(out)
  if not outputs or outputs[0] is None:
    return x, None
  return x, jax.tree.map(lambda *a: jnp.stack(a), *outputs)


def classifier_head(x, num_classes: int, head_bias_init: float,
                    param_dtype: Dtype, name: str = 'head') -> jax.Array:
  """Zero-initialised linear classifier, computed in float32."""
  return nn.Dense(
      num_classes,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.constant(head_bias_init),
      name=name)(x)


def check_images(images, family: str) -> None:
  if getattr(images, 'ndim', None) != 4:
    raise ValueError(
        f'{family} expects images shaped (batch, height, width, channels), '
        f'got shape {getattr(images, "shape", None)}.')

