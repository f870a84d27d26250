"""What ViT and Mixer share: MLP block, drop-path, layer stacks, the token grid, intermediates.

The layer stack runs either as a Python loop (one parameter subtree per layer, named `<name>_<i>`
as in the released checkpoints) or as one `nn.scan` over stacked parameters (subtree `<name>` with
a leading layer axis), which compiles deep models much faster. `mixer_vit.models.params_io` converts
between the two.

Intermediate outputs are sown into the 'intermediates' collection (flax `Module.sow`) and only
when that collection is mutable; `apply_with_intermediates` runs a model that way and gathers
them, stacked on a leading layer axis for both layer-stack variants.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit.models import params_io
from mixer_vit.models import precision

Dtype = Any
Initializer = Callable[..., jax.Array]

INTERMEDIATES = 'intermediates'
# What a rematerialised block keeps for the backward pass (model.remat_policy, with remat=True);
# the rest is recomputed. 'nothing': only the block's input (the whole block recomputed);
# 'dots': every matrix-multiply output; 'dots_no_batch': the outputs of matrix multiplies without
# batch dimensions (the dense layers' kernels, not the attention scores and mixing).
REMAT_POLICIES = {
  'nothing': jax.checkpoint_policies.nothing_saveable,
  'dots': jax.checkpoint_policies.dots_saveable,
  'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# What the models sow as the head's input, returned as 'pre_logits' by apply_with_intermediates
# (the name 'pre_logits' itself belongs to the ViT's representation layer).
HEAD_INPUT = 'head_input'


def to_dtype(name_or_dtype: Any) -> np.dtype:
  """Turns 'bfloat16' / jnp.bfloat16 / np.float32 into a numpy dtype."""
  try:
    return jnp.dtype(name_or_dtype)
  except TypeError as e:
    raise ValueError(f"Unknown dtype {name_or_dtype!r}; use e.g. 'float32' or 'bfloat16'.") from e


def freeze(value: Any) -> Any:
  """Nested dicts / ConfigDicts -> FrozenDict, lists -> tuples: hashable module fields."""
  if hasattr(value, 'to_dict'):  # ml_collections.ConfigDict
    value = value.to_dict()
  if isinstance(value, Mapping):
    return flax.core.FrozenDict({k: freeze(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(freeze(v) for v in value)
  return value


def freeze_fields(module: nn.Module, *names: str) -> None:
  """Call from `__post_init__`: dict-valued fields frozen so the module stays hashable."""
  for name in names:
    object.__setattr__(module, name, freeze(getattr(module, name)))


# ------------------------------------------------------------------------------------------------
# Token grid.


# ------------------------------------------------------------------------------------------------
# Layers.


def drop_path_rates(stochastic_depth: float, num_layers: int) -> np.ndarray:
  """Per-layer drop-path rates rising linearly from 0 to `stochastic_depth`."""
  if num_layers <= 1:
    return np.full((num_layers,), stochastic_depth, np.float32)
  return np.linspace(0.0, stochastic_depth, num_layers, dtype=np.float32)


def drop_path(module: nn.Module, y: jax.Array, rate: Any, deterministic: bool) -> jax.Array:
  """Drops whole residual branches per example (stochastic depth).

  Kept branches are scaled by 1 / keep so the expectation is unchanged. `rate` may be a traced
  scalar (it is scanned over layers).
  """
  if deterministic:
    return y
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (y.shape[0],) + (1,) * (y.ndim - 1)
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, shape)
  return jnp.where(mask, y / keep.astype(y.dtype), jnp.zeros_like(y))


@jax.checkpoint
def gelu(x):
  """`nn.gelu(x, approximate=True)`, recomputed from `x` in the backward pass.

  Differentiated as is, the tanh of every hidden unit is kept for the backward pass: one more
  (batch, tokens, mlp_dim) array written per layer. Recomputing it instead made a float32
  ViT-Ti/16 training step 3 % faster on CPU, a mixed-precision one 4 % slower (there the
  forward pass already writes the bfloat16 copy the next product reads), so MlpBlock uses it in
  float32 only.
  """
  return nn.gelu(x, approximate=True)


class MlpBlock(nn.Module):
  """Dense -> GELU (tanh approximation) -> dropout -> Dense -> dropout."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    dense = lambda n: nn.Dense(
      n,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      **precision.matmul_kwargs(self.matmul_dtype),
    )
    out_dim = x.shape[-1]
    x = dense(self.mlp_dim)(x)
    x = gelu(x) if self.matmul_dtype is None else nn.gelu(x, approximate=True)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim)(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


def layer_stack(
  block_cls: type[nn.Module],
  x: jax.Array,
  *,
  num_layers: int,
  name: str,
  scan: bool,
  remat: bool,
  stochastic_depth: float,
  remat_policy: str = 'nothing',
  per_layer: jax.Array | None = None,
  outputs: bool = False,
  **block_kwargs: Any,
) -> jax.Array | tuple[jax.Array, Any]:
  """Applies `num_layers` blocks to `x`; call inside a compact method.

  Each block is called as `block(x, drop_rate) -> (x, y)` (y None unless the block is asked for
  an output) and sows its own intermediates; under `scan` they come out stacked on a leading
  layer axis. `per_layer` (layers, ...): a third argument, block i getting `per_layer[i]`.
  `outputs`: return `(x, ys)`, the blocks' second outputs stacked on a leading layer axis.
  """
  rates = drop_path_rates(stochastic_depth, num_layers)
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(
      f'Unknown remat_policy {remat_policy!r}; choose one of {", ".join(REMAT_POLICIES)}.'
    )
  policy = REMAT_POLICIES[remat_policy]
  cls = nn.remat(block_cls, prevent_cse=not scan, policy=policy) if remat else block_cls
  if scan:
    stack = nn.scan(
      cls,
      variable_axes={'params': 0, INTERMEDIATES: 0},
      split_rngs={'params': True, 'dropout': True},
      in_axes=0,
      length=num_layers,
    )(name=name, **block_kwargs)
    extra = () if per_layer is None else (per_layer,)
    x, ys = stack(x, jnp.asarray(rates), *extra)
    return (x, ys) if outputs else x
  ys = []
  for i in range(num_layers):
    extra = () if per_layer is None else (per_layer[i],)
    x, y = cls(name=f'{name}_{i}', **block_kwargs)(x, float(rates[i]), *extra)
    ys.append(y)
  if not outputs:
    return x
  return x, (None if ys[0] is None else jnp.stack(ys))


def classifier_head(
  x: jax.Array, num_classes: int, head_bias_init: float, param_dtype: Dtype, name: str = 'head'
) -> jax.Array:
  """Zero-initialised linear classifier, computed in float32."""
  return nn.Dense(
    num_classes,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    kernel_init=nn.initializers.zeros,
    bias_init=nn.initializers.constant(head_bias_init),
    name=name,
  )(x)


def check_images(images: Any, family: str) -> None:
  if getattr(images, 'ndim', None) != 4:
    raise ValueError(
      f'{family} expects images shaped (batch, height, width, channels), '
      f'got shape {getattr(images, "shape", None)}.'
    )


# ------------------------------------------------------------------------------------------------
# Intermediate outputs.

# Sown by the models: per block 'blocks' (and 'attention' for ViT), once 'encoded', HEAD_INPUT.
_ORDER = ('blocks', 'attention', 'encoded', HEAD_INPUT)
_RETURNED_AS = {HEAD_INPUT: 'pre_logits'}
_LAYER_INDEX = re.compile(r'_(\d+)$')


def apply_with_intermediates(
  model: nn.Module,
  params: Mapping,
  images: jax.Array,
  *,
  train: bool = False,
  rngs: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs `model` and returns `(logits, intermediates)`; jittable.

  `intermediates` holds 'blocks' (layers, B, T, D), each block's output; 'attention'
  (layers, B, heads, T, T) for ViT, the attention weights (computed explicitly, so the logits
  are those of the explicit attention path); 'encoded' (B, T, D), the tokens after the final
  LayerNorm; and 'pre_logits', the input of the head. Same for `scan=True` models.
  """
  logits, state = model.apply(
    {'params': params_io.unwrap(params)},
    images,
    train=train,
    rngs=rngs or {},
    mutable=INTERMEDIATES,
  )
  found: dict[str, Any] = {}
  per_layer: dict[str, dict[int, Any]] = {}

  def gather(tree: Mapping, parent: str) -> None:
    for key, value in tree.items():
      if isinstance(value, Mapping):
        gather(value, key)
        continue
      value = value[0]  # `sow` keeps a tuple of the values of each call; there is one call.
      layer = _LAYER_INDEX.search(parent)
      if layer:  # A block of the per-layer loop (`<name>_<i>`).
        per_layer.setdefault(key, {})[int(layer.group(1))] = value
      else:  # The model itself, or the blocks of a scan (already stacked).
        found[key] = value

  gather(state.get(INTERMEDIATES, {}), '')
  for key, layers in per_layer.items():
    found[key] = jnp.stack([layers[i] for i in sorted(layers)])
  return logits, {_RETURNED_AS.get(key, key): found[key] for key in _ORDER if key in found}
