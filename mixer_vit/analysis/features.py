"""Per-sub-block feature maps of any model, observed from outside with `nn.intercept_methods`.

Nothing in the models changes: every module call is intercepted, and the sub-blocks are read off
the calls, in depth order, each as (kind, input map, output map) with maps (B, H, W, C):

- ViT and hybrids: each encoder block gives an 'attention' sub-block (input x, output
  x + MHA(LN(x)), the residual stream after attention) and an 'mlp' sub-block (output: the
  block's output); class tokens are dropped and the tokens laid out on their grid. A hybrid's
  ResNet units come first, as 'conv'.
- Mixer: 'token_mixing' (x + token MLP) then 'mlp' (the channel MLP; the block's output).
- ResNet: each bottleneck unit, 'conv'. AlterNet: its units, 'conv' or 'attention' (MSA units).

Evaluation mode only (no dropout, no drop-path): then the residual sums rebuilt here are the
models' own. The model must be unrolled (`common.unrolled`): the blocks of an `nn.scan` run
inside a loop that cannot be observed this way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixer_vit.models import alternet
from mixer_vit.models import common as model_common
from mixer_vit.models import geometry
from mixer_vit.models import mixer
from mixer_vit.models import resnet
from mixer_vit.models import vit


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Block:
  """One sub-block (a pytree: the maps are its leaves, so jitted functions may return it).

  `name`: the '/'-joined module path, e.g. 'Transformer/encoderblock_0/mlp'; `kind`: 'conv',
  'attention', 'token_mixing' or 'mlp'; `input`, `output`: (B, H, W, C) float32 maps.
  """

  name: str = dataclasses.field(metadata={'static': True})
  kind: str = dataclasses.field(metadata={'static': True})
  input: jax.Array
  output: jax.Array


@dataclasses.dataclass
class _Call:
  path: tuple[str, ...]
  module: nn.Module
  args: tuple
  output: Any


def _record_calls(model: nn.Module, params: Any, images: jax.Array) -> tuple[jax.Array, list]:
  calls: list[_Call] = []
  watched = (
    vit.EncoderBlock,
    vit.MultiHeadDotProductAttention,
    mixer.MixerBlock,
    model_common.MlpBlock,
    resnet.ResidualUnit,
    alternet.MSAUnit,
  )

  def interceptor(next_fun, args, kwargs, context):
    output = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(module, watched):
      calls.append(_Call(tuple(module.scope.path), module, args, output))
    return output

  with nn.intercept_methods(interceptor):
    logits = model.apply({'params': params}, images, train=False)
  return logits, calls


def capture(
  model: nn.Module,
  params: Any,
  images: jax.Array,
  model_config: Any,
  grid: tuple[int, int] | None = None,
) -> tuple[jax.Array, list[Block]]:
  """(logits, sub-blocks in depth order) of `model` on `images` (module docstring); jittable.

  `grid`: (rows, cols) of the token layout (ViT / Mixer); default square.
  """
  logits, calls = _record_calls(model, params, images)
  by_path = {c.path: c for c in calls}

  def to_map(tokens):
    tokens = tokens.astype(jnp.float32)
    n, t, c = tokens.shape
    if model_config.family == 'vit' and model_config.classifier in ('token', 'token_unpooled'):
      tokens, t = tokens[:, 1:], t - 1
    rows, cols = grid if grid else _square(t)
    return jnp.reshape(tokens, (n, rows, cols, c))

  blocks = []
  for call in calls:
    name = '/'.join(call.path)
    module = call.module
    if isinstance(module, (resnet.ResidualUnit, alternet.MSAUnit)):
      kind = 'attention' if isinstance(module, alternet.MSAUnit) else 'conv'
      blocks.append(
        Block(name, kind, call.args[0].astype(jnp.float32), call.output.astype(jnp.float32))
      )
    elif isinstance(module, vit.EncoderBlock):
      x = call.args[0]
      attention = by_path[call.path + ('MultiHeadDotProductAttention_1',)].output[0]
      middle = x + attention
      out = call.output[0]
      blocks.append(Block(name + '/attention', 'attention', to_map(x), to_map(middle)))
      blocks.append(Block(name + '/mlp', 'mlp', to_map(middle), to_map(out)))
    elif isinstance(module, mixer.MixerBlock):
      x = call.args[0]
      mixed = by_path[call.path + ('token_mixing',)].output
      middle = x + jnp.swapaxes(mixed, 1, 2)
      out = call.output[0]
      blocks.append(Block(name + '/token_mixing', 'token_mixing', to_map(x), to_map(middle)))
      blocks.append(Block(name + '/channel_mixing', 'mlp', to_map(middle), to_map(out)))
  if not blocks:
    raise ValueError(
      f'no blocks found in {model_config.name} ({model_config.family}); the analyses need an '
      'unrolled model (analysis.common.unrolled)'
    )
  return logits, blocks


def _square(tokens: int) -> tuple[int, int]:
  side = int(round(tokens**0.5))
  if side * side != tokens:
    raise ValueError(
      f'{tokens} tokens do not form a square grid; pass grid=(rows, cols) (models.token_grid)'
    )
  return side, side


def token_grid(subject_config: Any, image_size: tuple[int, int]) -> tuple[int, int] | None:
  """The token grid of a ViT / Mixer at `image_size`; None for convolutional families."""
  if subject_config.family in ('vit', 'mixer'):
    return tuple(geometry.token_grid(subject_config, image_size))
  return None


def block_names(model: nn.Module, params: Any, images_shape: tuple[int, ...], model_config) -> list:
  """(name, kind) of each sub-block, from an abstract evaluation (nothing computed)."""
  grid = token_grid(model_config, images_shape[1:3])
  found = []

  def names(p, x):
    _, blocks = capture(model, p, x, model_config, grid)
    found.extend((b.name, b.kind) for b in blocks)
    return 0

  jax.eval_shape(names, params, jax.ShapeDtypeStruct(images_shape, jnp.float32))
  return found
