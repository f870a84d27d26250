"""`.npz` parameter files in the layout of the released ViT / Mixer checkpoints.

File format: one array per parameter, keys are the tree path joined with '/'
(`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`), always per layer.
Models built with `scan=True` hold the layers stacked under `encoderblock` /
`MixerBlock` with a leading layer axis; `save_npz` unstacks and
`load_pretrained` / `load_params` stack them back as needed.

bfloat16 leaves are written as float32 (plain `.npz` has no portable bfloat16);
`load_pretrained` / `load_params` cast back to the dtypes of the model.
Paths: local files or anything `tf.io.gfile` opens (e.g. `gs://...`).
"""

import io
import logging
import os
import re
import uuid
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np

from mixer_vit import models

Params = Dict[str, Any]

# Scanned layer stacks: stacked subtree name -> per-layer name prefix.
STACKED_NAMES = ('encoderblock', 'MixerBlock')
_PER_LAYER = re.compile(r'^(encoderblock|MixerBlock)_(\d+)$')
# GroupNorm scale/bias of old hybrid checkpoints are (1, 1, 1, C).
_GROUP_NORM = re.compile(r'^gn(\d+|_root|_proj)$')
# Linen-numbered encoder blocks (vit_jax after convert_pre_linen) -> file names.
_LINEN_BLOCK_NAMES = {
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}


# ---------------------------------------------------------------------------
# Tree helpers.


def _is_mapping(x) -> bool:
  return isinstance(x, Mapping)


def flatten(tree: Mapping, prefix: str = '') -> Dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if _is_mapping(value):
      flat.update(flatten(value, path + '/'))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Params:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: Params = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _to_numpy_tree(tree: Mapping) -> Params:
  return {k: _to_numpy_tree(v) if _is_mapping(v) else np.asarray(v)
          for k, v in tree.items()}


def is_stacked(params: Mapping) -> bool:
  """Whether the tree holds scan-stacked layers (`encoderblock`, `MixerBlock`)."""
  if 'MixerBlock' in params:
    return True
  transformer = params.get('Transformer')
  return _is_mapping(transformer) and 'encoderblock' in transformer


def unstack_layers(params: Mapping) -> Params:
  """Scan-stacked subtrees -> per-layer subtrees `<name>_<i>` (file layout)."""
  out = {}
  for key, value in params.items():
    if key in STACKED_NAMES and _is_mapping(value):
      leaves = jax.tree.leaves(value)
      count = leaves[0].shape[0] if leaves else 0
      for i in range(count):
        out[f'{key}_{i}'] = jax.tree.map(lambda a, i=i: a[i], dict(value))
    elif _is_mapping(value):
      out[key] = unstack_layers(value)
    else:
      out[key] = value
  return out


def stack_layers(params: Mapping) -> Params:
  """Per-layer subtrees `<name>_<i>` -> one scan-stacked subtree `<name>`."""
  out, groups = {}, {}
  for key, value in params.items():
    match = _PER_LAYER.match(key)
    if match and _is_mapping(value):
      groups.setdefault(match.group(1), {})[int(match.group(2))] = value
    elif _is_mapping(value):
      out[key] = stack_layers(value)
    else:
      out[key] = value
  for name, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f'Layers {name}_<i> are not numbered 0..{len(layers)-1}'
                       f': found {sorted(layers)}.')
    ordered = [layers[i] for i in range(len(layers))]
    try:
      out[name] = jax.tree.map(lambda *a: np.stack(a), *ordered)
    except ValueError as e:
      raise ValueError(f'The {name}_<i> layers differ in structure or '
                       f'shape and cannot be stacked: {e}') from e
  return out


# ---------------------------------------------------------------------------
# Files.


def _open(path, mode):
  path = os.fspath(path)
  if _is_remote(path):
    from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
    return gfile.GFile(path, mode)
  return open(path, mode)


def _is_remote(path) -> bool:
  return '://' in os.fspath(path)


def load_npz(path) -> Params:
  """Reads an `.npz` parameter file into a nested dict of numpy arrays."""
  if _is_remote(path):
    with _open(path, 'rb') as f:
      source = io.BytesIO(f.read())
  else:
    source = os.fspath(path)
  with np.load(source, allow_pickle=False) as npz:
    flat = {key: npz[key] for key in npz.files}
  if not flat:
    raise ValueError(f'{path} holds no arrays.')
  return unflatten(flat)


def save_npz(params: Mapping, path) -> None:
  """Writes params as `.npz` in the per-layer file layout (see module doc).

  Accepts `{'params': tree}` too. bfloat16 leaves are stored as float32.
  Local files are written atomically (temporary file, then rename).
  """
  params = _strip_params_key(params)
  flat = flatten(unstack_layers(params))
  arrays = {}
  for key, value in flat.items():
    array = np.asarray(jax.device_get(value))
    if array.dtype == object:
      raise ValueError(f'{key} is not a numeric array (dtype object).')
    if array.dtype.name == 'bfloat16':
      array = array.astype(np.float32)
    arrays[key] = array
  path = os.fspath(path)
  if _is_remote(path):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with _open(path, 'wb') as f:
      f.write(buffer.getvalue())
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # A temporary name next to the target (normal permissions), then rename.
  tmp = f'{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ---------------------------------------------------------------------------
# Adapting checkpoints to models.


def _strip_params_key(tree: Mapping) -> Mapping:
  if set(tree) == {'params'} and _is_mapping(tree['params']):
    return tree['params']
  return tree


def fix_legacy(params: Mapping) -> Params:
  """Adapts older file variants to the current layout.

  - GroupNorm scale/bias of old hybrid checkpoints, shaped (1, 1, 1, C),
    become (C,).
  - Encoder blocks numbered per class as linen does (`LayerNorm_1`,
    `MultiHeadDotProductAttention_0`, `MlpBlock_0`) get the names of the
    released files (`LayerNorm_2`, `MultiHeadDotProductAttention_1`,
    `MlpBlock_3`).
  """
  def fix(tree, parent=''):
    out = {}
    linen_block = (_PER_LAYER.match(parent) and parent.startswith('encoder')
                   and 'MlpBlock_0' in tree and 'MlpBlock_3' not in tree)
    for key, value in tree.items():
      if linen_block:
        key = _LINEN_BLOCK_NAMES.get(key, key)
      if _is_mapping(value):
        out[key] = fix(value, key)
      elif _GROUP_NORM.match(parent) and key in ('scale', 'bias'):
        out[key] = np.reshape(value, (-1,))
      else:
        out[key] = value
    return out
  return fix(params)


def _restored_tree(path_or_params) -> Params:
  if isinstance(path_or_params, (str, os.PathLike)):
    tree = load_npz(path_or_params)
  elif _is_mapping(path_or_params):
    tree = _to_numpy_tree(_strip_params_key(path_or_params))
  else:
    raise TypeError('Expected a path or a nested dict of parameters, got '
                    f'{type(path_or_params).__name__}.')
  return fix_legacy(unstack_layers(tree))


def _shape(x) -> Tuple[int, ...]:
  return tuple(np.shape(x)) if not hasattr(x, 'shape') else tuple(x.shape)


def _limited(items, limit=30) -> str:
  items = sorted(items)
  text = '\n    '.join(items[:limit])
  if len(items) > limit:
    text += f'\n    ... and {len(items) - limit} more'
  return text


def verify_tree(restored: Mapping, expected: Mapping, what: str = 'checkpoint',
                hints: Optional[Dict[str, str]] = None) -> None:
  """Raises a ValueError listing missing, unexpected and mis-shaped keys."""
  got, want = flatten(restored), flatten(expected)
  missing = want.keys() - got.keys()
  unexpected = got.keys() - want.keys()
  mismatched = [f'{k}: {what} {_shape(got[k])} vs model {_shape(want[k])}'
                for k in want.keys() & got.keys()
                if _shape(got[k]) != _shape(want[k])]
  if not (missing or unexpected or mismatched):
    return
  parts = [f'The {what} does not fit the model.']
  if missing:
    parts.append(f'  Missing keys ({len(missing)}):\n    {_limited(missing)}')
  if unexpected:
    parts.append(f'  Unexpected keys ({len(unexpected)}):\n    '
                 f'{_limited(unexpected)}')
  if mismatched:
    parts.append(f'  Shape mismatches ({len(mismatched)}):\n    '
                 f'{_limited(mismatched)}')
  for fragment, hint in (hints or {}).items():
    if any(fragment in k for k in [*missing, *unexpected,
                                          *(m.split(':')[0] for m in mismatched)]):
      parts.append('  Hint: ' + hint)
  raise ValueError('\n'.join(parts))


def _has_class_token(params: Mapping) -> bool:
  return 'cls' in params


def _grid_of(num_tokens: int, config: ml_collections.ConfigDict,
             hint_size=None) -> Optional[Tuple[int, int]]:
  """Token grid with `num_tokens` cells: config's image size, else square."""
  if hint_size is not None:
    grid = models.token_grid(config, hint_size)
    if grid[0] * grid[1] == num_tokens:
      return grid
  grid = models.token_grid(config)
  if grid[0] * grid[1] == num_tokens:
    return grid
  side = int(round(np.sqrt(num_tokens)))
  if side * side == num_tokens:
    return side, side
  return None


def _interp_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Linear interpolation along `axis` with corners aligned (like
  scipy.ndimage.zoom(order=1)), so linear ramps stay exactly linear."""
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


def resize_posemb_grid(grid: np.ndarray, new_shape: Tuple[int, int]):
  """Bilinear resize of a (rows, cols, D) position-embedding grid."""
  dtype = grid.dtype
  out = grid.astype(np.float64)
  out = _interp_axis(out, 0, new_shape[0])
  out = _interp_axis(out, 1, new_shape[1])
  return out.astype(dtype)


def resize_posemb(posemb: np.ndarray, old_grid: Tuple[int, int],
                  new_grid: Tuple[int, int], num_extra_tokens: int):
  """Resizes (1, extra + rows*cols, D) embeddings; extra (class) tokens kept."""
  posemb = np.asarray(posemb)
  extra, grid = posemb[:, :num_extra_tokens], posemb[0, num_extra_tokens:]
  if grid.shape[0] != old_grid[0] * old_grid[1]:
    raise ValueError(f'{grid.shape[0]} grid tokens do not form a {old_grid} '
                     'grid.')
  grid = grid.reshape(old_grid[0], old_grid[1], -1)
  grid = resize_posemb_grid(grid, new_grid).reshape(1, -1, posemb.shape[-1])
  return np.concatenate([extra, grid.astype(posemb.dtype)], axis=1)


def _resize_posemb_in_tree(restored: Params, init_flat: Dict[str, Any],
                           config: ml_collections.ConfigDict, source_grid):
  key = 'Transformer/posembed_input/pos_embedding'
  if key not in init_flat:
    return
  posemb = restored.get('Transformer', {}).get('posembed_input', {}).get(
      'pos_embedding')
  if posemb is None or _shape(posemb) == _shape(init_flat[key]):
    return
  new = _shape(init_flat[key])
  if len(_shape(posemb)) != 3 or _shape(posemb)[2] != new[2]:
    return  # Reported as a shape mismatch by verify_tree.
  extra = 1 if 'cls' in init_flat else 0
  new_grid = _grid_of(new[1] - extra, config)
  old_count = _shape(posemb)[1] - extra
  old_grid = tuple(source_grid) if source_grid else _grid_of(old_count, config)
  if new_grid is None:
    raise ValueError(
        f'The model has {new[1] - extra} position embeddings, which is neither '
        f'the token grid of config.image_size={tuple(config.image_size)} nor '
        'square. Set image_size in the model config to the resolution the '
        'parameters were initialised for.')
  if old_grid is None or old_grid[0] * old_grid[1] != old_count:
    raise ValueError(
        f'The checkpoint has {old_count} grid position embeddings, which do '
        'not form a square grid; pass source_grid=(rows, cols).')
  logging.info('Resizing position embeddings from grid %s to %s.', old_grid,
               new_grid)
  restored['Transformer']['posembed_input']['pos_embedding'] = resize_posemb(
      posemb, old_grid, new_grid, extra)


def _cast_like(restored: Params, reference: Mapping) -> Params:
  def cast(value, ref):
    return np.asarray(value).astype(ref.dtype)
  return jax.tree.map(cast, restored, dict(reference))


_HEAD_PARTS = ('head', 'pre_logits', 'MAPHead_0')

_HINTS = {
    'head/': 'the head size follows num_classes; set num_classes to the '
             'checkpoint\'s class count (or use load_pretrained, which '
             'replaces the head).',
    'pre_logits/': 'the checkpoint has a pre_logits layer; set '
                   'representation_size to its width to keep it (or use '
                   'load_pretrained, which drops it when the config has none).',
    'Transformer/posembed_input/': 'position embeddings follow the image '
                                   'size; load_pretrained resizes them.',
    '/token_mixing/': 'Mixer token-mixing layers are tied to the number of '
                      'patches; use the image_size (and patch size) the '
                      'checkpoint was trained with.',
}


def load_pretrained(path_or_params, init_params: Mapping,
                    model_config: ml_collections.ConfigDict, *,
                    source_grid: Optional[Tuple[int, int]] = None) -> Params:
  """Adapts a pretrained checkpoint to a (new) model for fine-tuning.

  Args:
    path_or_params: `.npz` path or an already loaded nested dict.
    init_params: freshly initialised params of the target model (possibly
      scan-stacked, possibly `{'params': ...}`); they provide the new head and
      the shapes to check against.
    model_config: config of the target model (image_size, representation_size).
    source_grid: (rows, cols) of the checkpoint's position-embedding grid when
      it is not square (square is assumed otherwise).

  Returns:
    Params shaped and typed like `init_params` (numpy arrays): pretrained
    weights, the new head (and pre_logits / MAP pooling head when the
    checkpoint has none of that shape), position embeddings resized bilinearly to the new
    grid (class token kept), layers stacked when `init_params` are.

  Raises:
    ValueError listing missing / unexpected keys and shape mismatches.
  """
  wrapped = set(init_params) == {'params'}
  init_params = _strip_params_key(init_params)
  expected = unstack_layers(init_params)
  init_flat = flatten(expected)
  restored = _restored_tree(path_or_params)

  # Head parts: dropped when the new model has none, the new head always,
  # pre_logits / MAP pooling kept only when the checkpoint has them in the
  # same shapes.
  for name in _HEAD_PARTS:
    if name in restored and name not in expected:
      logging.info('load_pretrained: dropping %s of the checkpoint.', name)
      del restored[name]
  if 'head' in expected:
    restored['head'] = dict(expected['head'])
  for name in _HEAD_PARTS[1:]:
    if name not in expected:
      continue
    old = {k: _shape(v) for k, v in flatten(restored.get(name, {})).items()}
    new = {k: _shape(v) for k, v in flatten(expected[name]).items()}
    if old != new:
      logging.info('load_pretrained: freshly initialised %s.', name)
      restored[name] = dict(expected[name])
  _resize_posemb_in_tree(restored, init_flat, model_config, source_grid)

  verify_tree(restored, expected, 'checkpoint', _HINTS)
  params = _cast_like(restored, expected)
  if is_stacked(init_params):
    params = stack_layers(params)
  return {'params': params} if wrapped else params


def image_size_from_params(params: Mapping,
                           model_config: ml_collections.ConfigDict):
  """(H, W) a checkpoint was made for, from its token count; None if unknown.

  ViT: position-embedding grid; Mixer: token-mixing width. The config's
  image_size is returned when its grid matches, otherwise a square grid is
  assumed; None when the count is not a square (or the tree has neither).
  """
  params = _strip_params_key(params)
  if model_config.family == 'mixer':
    try:
      if 'MixerBlock' in params:  # scan-stacked: leading layer axis
        num = _shape(params['MixerBlock']['token_mixing']['Dense_0'][
            'kernel'])[1]
      else:
        num = _shape(params['MixerBlock_0']['token_mixing']['Dense_0'][
            'kernel'])[0]
    except KeyError:
      return None
  else:
    try:
      num = _shape(params['Transformer']['posembed_input']['pos_embedding'])[1]
    except KeyError:
      return None
    num -= 1 if _has_class_token(params) else 0
  grid = models.token_grid(model_config)
  if grid[0] * grid[1] == num:
    return tuple(model_config.image_size)
  side = int(round(np.sqrt(num)))
  if side * side != num:
    return None
  ph, pw = models.pixels_per_token(model_config)
  return side * ph, side * pw


def load_params(path_or_params, model_config: ml_collections.ConfigDict):
  """Loads a checkpoint for inference with the model of `model_config`.

  Unlike `load_pretrained` nothing is replaced: the head, pre_logits and the
  position embeddings must fit the config (errors say which setting to
  change). Legacy layouts are fixed, layers stacked for `scan=True`, and
  leaves cast to `param_dtype`. Feed images of
  `image_size_from_params(params, model_config)`.
  """
  restored = _restored_tree(path_or_params)
  size = image_size_from_params(restored, model_config)
  if size is None:
    size = tuple(model_config.image_size)
  unrolled = model_config.copy_and_resolve_references()
  unrolled.scan = False
  model = models.build_model(unrolled)
  shapes = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0)},
                         np.zeros((1, *size, 3), np.float32))['params'])
  verify_tree(restored, shapes, 'checkpoint', _HINTS)
  params = _cast_like(restored, shapes)
  if model_config.scan:
    params = stack_layers(params)
  return params
