"""Loading `.npz` checkpoints into the models: for fine-tuning and for inference.

The steps every family shares are here: read the file (`params_io`), unstack scanned layers,
replace the head, check the tree against the model, cast, restack. What is particular to a family
lives beside its model and is found through `config.family`: `vit.py` resizes position embeddings
and keeps or renews pre_logits / the MAP head, renames pre-linen blocks (and `resnet.py` fixes the
GroupNorm shapes of older hybrids); `mixer.py` reads the resolution from the token-mixing width.
Each family file provides `fix_legacy`, `adapt_pretrained`, `num_grid_tokens` and `LOAD_HINTS`.
"""

from __future__ import annotations

from collections.abc import Mapping
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mixer_vit.models import geometry
from mixer_vit.models import params_io
from mixer_vit.models import registry

Params = dict[str, Any]

_HEAD_HINT = {
  'head/': "the head size follows num_classes; set num_classes to the checkpoint's class count "
  '(or use load_pretrained, which replaces the head).',
}


def _hints(family: Any) -> dict[str, str]:
  return {**_HEAD_HINT, **family.LOAD_HINTS}


def _restore(path_or_params: Any, family: Any) -> Params:
  """The checkpoint as per-layer numpy tree, older layouts fixed."""
  if isinstance(path_or_params, (str, os.PathLike)):
    tree = params_io.load_npz(path_or_params)
  elif isinstance(path_or_params, Mapping):
    tree = params_io.to_numpy(params_io.unwrap(path_or_params))
  else:
    raise TypeError(
      f'Expected a path or a nested dict of parameters, got {type(path_or_params).__name__}.'
    )
  return family.fix_legacy(params_io.unstack_layers(tree))


def load_pretrained(
  path_or_params: Any,
  init_params: Mapping,
  model_config: ml_collections.ConfigDict,
  *,
  source_grid: tuple[int, int] | None = None,
) -> Params:
  """Adapts a pretrained checkpoint to a (new) model for fine-tuning.

  Args:
    path_or_params: `.npz` path or an already loaded nested dict.
    init_params: freshly initialised params of the target model (possibly scan-stacked, possibly
      `{'params': ...}`); they provide the new head and the shapes to check against.
    model_config: config of the target model (family, image_size, representation_size).
    source_grid: (rows, cols) of the checkpoint's position-embedding grid when it is not square
      (square is assumed otherwise).

  Returns:
    Params shaped and typed like `init_params` (numpy arrays): pretrained weights, the new head
    (and pre_logits / MAP pooling head when the checkpoint has none of that shape), position
    embeddings resized bilinearly to the new grid (class token kept), layers stacked when
    `init_params` are.

  Raises:
    ValueError listing missing / unexpected keys and shape mismatches.
  """
  family = registry.family(model_config)
  wrapped = set(init_params) == {'params'}
  init_params = params_io.unwrap(init_params)
  expected = params_io.unstack_layers(init_params)
  restored = _restore(path_or_params, family)

  # The head follows the task: always the new model's (or none).
  if 'head' in restored and 'head' not in expected:
    logging.info('load_pretrained: dropping head of the checkpoint.')
    del restored['head']
  if 'head' in expected:
    restored['head'] = dict(expected['head'])
  family.adapt_pretrained(restored, expected, model_config, source_grid)

  params_io.verify_tree(restored, expected, 'checkpoint', _hints(family))
  params = params_io.cast_like(restored, expected)
  if params_io.is_stacked(init_params):
    params = params_io.stack_layers(params)
  return {'params': params} if wrapped else params


def image_size_from_params(
  params: Mapping, model_config: ml_collections.ConfigDict
) -> tuple[int, int] | None:
  """(H, W) a checkpoint was made for, from its token count; None if unknown.

  ViT: position-embedding grid; Mixer: token-mixing width. The config's image_size is returned
  when its grid matches, otherwise a square grid is assumed; None when the count is not a square
  (or the tree has neither).
  """
  num = registry.family(model_config).num_grid_tokens(params_io.unwrap(params))
  if num is None:
    return None
  grid = geometry.token_grid(model_config)
  if grid[0] * grid[1] == num:
    return tuple(model_config.image_size)
  side = int(round(np.sqrt(num)))
  if side * side != num:
    return None
  ph, pw = geometry.pixels_per_token(model_config)
  return side * ph, side * pw


def load_params(
  path_or_params: Any, model_config: ml_collections.ConfigDict, *, resize: bool = False
) -> Params:
  """Loads a checkpoint for inference with the model of `model_config`.

  Unlike `load_pretrained` nothing is replaced: the head, pre_logits and the position embeddings
  must fit the config (errors say which setting to change). Legacy layouts are fixed, layers
  stacked for `scan=True`, and leaves cast to `param_dtype`. Feed images of
  `image_size_from_params(params, model_config)`.

  With `resize`, a checkpoint made for another resolution than `model_config.image_size` is
  adapted to it where its family allows (ViT: position embeddings resized bilinearly, as
  `load_pretrained` does); a family whose layers fix the grid (Mixer's token mixing) raises a
  ValueError, as does an image size that is not a whole number of tokens.
  """
  family = registry.family(model_config)
  restored = _restore(path_or_params, family)
  size = image_size_from_params(restored, model_config)
  want = tuple(model_config.image_size)
  if resize and size is not None and size != want:
    _resize_to(restored, family, model_config, size)
    size = want
  if size is None:
    size = want
  shapes = _param_shapes(model_config, size)
  params_io.verify_tree(restored, shapes, 'checkpoint', _hints(family))
  params = params_io.cast_like(restored, shapes)
  if model_config.scan:
    params = params_io.stack_layers(params)
  return params


def _param_shapes(model_config: ml_collections.ConfigDict, size: tuple[int, int]) -> Any:
  """Per-layer parameter shapes of the model on (H, W) = `size` images (nothing computed)."""
  unrolled = model_config.copy_and_resolve_references()
  unrolled.scan = False
  model = registry.build_model(unrolled)
  return jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, np.zeros((1, *size, 3), np.float32))['params']
  )


def _resize_to(
  restored: Params, family: Any, model_config: ml_collections.ConfigDict, size: tuple[int, int]
) -> None:
  """Adapts (in place) a tree made for (H, W) = `size` images to `model_config.image_size`."""
  want = tuple(model_config.image_size)
  per_token = geometry.pixels_per_token(model_config)
  grid = geometry.token_grid(model_config)
  if any(g * p != w for g, p, w in zip(grid, per_token, want)):
    raise ValueError(
      f'image size {want} is not a whole number of {per_token[0]}x{per_token[1]}-pixel tokens '
      f'of {model_config.get("name", "the model")}; use a multiple, e.g. '
      f'{tuple(max(1, round(w / p)) * p for w, p in zip(want, per_token))}'
    )
  source_grid = (size[0] // per_token[0], size[1] // per_token[1])
  family.adapt_pretrained(restored, _param_shapes(model_config, want), model_config, source_grid)
  if family.num_grid_tokens(restored) != grid[0] * grid[1]:
    raise ValueError(
      f'a {model_config.family} checkpoint runs only at the resolution it was made for, '
      f'{size[0]}x{size[1]}: its layers are tied to the number of patches'
    )
