"""`.npz` parameter files in the layout of the released ViT / Mixer checkpoints, and tree helpers.

File format: one array per parameter, keys are the tree path joined with '/'
(`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`), always per layer. Models built with
`scan=True` hold their layers stacked under `encoderblock` / `MixerBlock` with a leading layer
axis; `save_npz` unstacks them, `stack_layers` stacks them back.

bfloat16 leaves are written as float32 (plain `.npz` has no portable bfloat16).
Paths: local files or anything `tf.io.gfile` opens (e.g. `gs://...`), through `mixer_vit.runtime.paths`.

Nothing here knows a model: adapting a file to a model (new head, resized position embeddings,
older layouts) is `mixer_vit.models.load_pretrained` / `load_params`, with each model family's
own steps beside its model.
"""

from __future__ import annotations

from collections.abc import Mapping
import io
import os
import re
from typing import Any
import zipfile
import zlib

import jax
import numpy as np

from mixer_vit.runtime import paths

Params = dict[str, Any]

# Layer stacks of scan=True models: stacked subtree name -> per-layer names `<name>_<i>`.
STACKED_NAMES = ('encoderblock', 'MixerBlock')
_PER_LAYER = re.compile(r'^(encoderblock|MixerBlock)_(\d+)$')


# ------------------------------------------------------------------------------------------------
# Trees.


def is_mapping(x: Any) -> bool:
  return isinstance(x, Mapping)


def unwrap(tree: Mapping) -> Mapping:
  """`{'params': tree}` -> `tree`; any other tree unchanged."""
  if set(tree) == {'params'} and is_mapping(tree['params']):
    return tree['params']
  return tree


def flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if is_mapping(value):
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


def to_numpy(tree: Mapping) -> Params:
  """The same nested dict with numpy arrays as leaves."""
  return {k: to_numpy(v) if is_mapping(v) else np.asarray(v) for k, v in tree.items()}


def shape(x: Any) -> tuple[int, ...]:
  """Shape of an array, a `jax.ShapeDtypeStruct` or anything `np.shape` takes."""
  return tuple(x.shape) if hasattr(x, 'shape') else tuple(np.shape(x))


def cast_like(tree: Mapping, reference: Mapping) -> Params:
  """numpy leaves of `tree` cast to the dtypes of the leaves of `reference` (same structure)."""
  return jax.tree.map(lambda v, ref: np.asarray(v).astype(ref.dtype), dict(tree), dict(reference))


def is_stacked(params: Mapping) -> bool:
  """Whether the tree holds scan-stacked layers (`encoderblock`, `MixerBlock`)."""
  if 'MixerBlock' in params:
    return True
  transformer = params.get('Transformer')
  return is_mapping(transformer) and 'encoderblock' in transformer


def unstack_layers(params: Mapping) -> Params:
  """Scan-stacked subtrees -> per-layer subtrees `<name>_<i>` (the file layout)."""
  out = {}
  for key, value in params.items():
    if key in STACKED_NAMES and is_mapping(value):
      leaves = jax.tree.leaves(value)
      count = leaves[0].shape[0] if leaves else 0
      for i in range(count):
        out[f'{key}_{i}'] = jax.tree.map(lambda a, i=i: a[i], dict(value))
    elif is_mapping(value):
      out[key] = unstack_layers(value)
    else:
      out[key] = value
  return out


def stack_layers(params: Mapping) -> Params:
  """Per-layer subtrees `<name>_<i>` -> one scan-stacked subtree `<name>`."""
  out, groups = {}, {}
  for key, value in params.items():
    match = _PER_LAYER.match(key)
    if match and is_mapping(value):
      groups.setdefault(match.group(1), {})[int(match.group(2))] = value
    elif is_mapping(value):
      out[key] = stack_layers(value)
    else:
      out[key] = value
  for name, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(
        f'Layers {name}_<i> are not numbered 0..{len(layers) - 1}: found {sorted(layers)}.'
      )
    ordered = [layers[i] for i in range(len(layers))]
    try:
      out[name] = jax.tree.map(lambda *a: np.stack(a), *ordered)
    except ValueError as e:
      raise ValueError(
        f'The {name}_<i> layers differ in structure or shape and cannot be stacked: {e}'
      ) from e
  return out


def _limited(items, limit: int = 30) -> str:
  items = sorted(items)
  text = '\n    '.join(items[:limit])
  if len(items) > limit:
    text += f'\n    ... and {len(items) - limit} more'
  return text


def verify_tree(
  restored: Mapping,
  expected: Mapping,
  what: str = 'checkpoint',
  hints: Mapping[str, str] | None = None,
) -> None:
  """Raises a ValueError listing missing, unexpected and mis-shaped keys.

  `hints` maps a key fragment to a sentence added when an offending key contains the fragment.
  """
  got, want = flatten(restored), flatten(expected)
  missing = want.keys() - got.keys()
  unexpected = got.keys() - want.keys()
  mismatched = [
    f'{k}: {what} {shape(got[k])} vs model {shape(want[k])}'
    for k in want.keys() & got.keys()
    if shape(got[k]) != shape(want[k])
  ]
  if not (missing or unexpected or mismatched):
    return
  parts = [f'The {what} does not fit the model.']
  if missing:
    parts.append(f'  Missing keys ({len(missing)}):\n    {_limited(missing)}')
  if unexpected:
    parts.append(f'  Unexpected keys ({len(unexpected)}):\n    {_limited(unexpected)}')
  if mismatched:
    parts.append(f'  Shape mismatches ({len(mismatched)}):\n    {_limited(mismatched)}')
  offending = [*missing, *unexpected, *(m.split(':')[0] for m in mismatched)]
  for fragment, hint in (hints or {}).items():
    if any(fragment in k for k in offending):
      parts.append('  Hint: ' + hint)
  raise ValueError('\n'.join(parts))


# ------------------------------------------------------------------------------------------------
# Files.


def load_npz(path) -> Params:
  """Reads an `.npz` parameter file into a nested dict of numpy arrays.

  Raises FileNotFoundError when it does not exist and a ValueError naming it when it is not a
  readable `.npz` (truncated download, another format, damaged data)."""
  if paths.is_remote(path):
    source = io.BytesIO(paths.read_bytes(path))
  else:
    source = os.fspath(path)
  try:
    npz = np.load(source, allow_pickle=False)
    if not hasattr(npz, 'files'):  # A .npy file: one array.
      raise ValueError('it holds one array, not named parameters')
    with npz:
      flat = {key: npz[key] for key in npz.files}
  except FileNotFoundError:
    raise
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
    raise ValueError(
      f'{path} is not a readable .npz parameter file ({type(e).__name__}: {e}); it may be '
      'truncated (download it again) or in another format.'
    ) from None
  if not flat:
    raise ValueError(f'{path} holds no arrays.')
  return unflatten(flat)


def save_npz(params: Mapping, path) -> None:
  """Writes params as `.npz` in the per-layer file layout (see module doc).

  Accepts `{'params': tree}` too. bfloat16 leaves are stored as float32.
  Local files are written atomically (temporary file, then rename), a URL in one object write.
  """
  flat = flatten(unstack_layers(unwrap(params)))
  arrays = {}
  for key, value in flat.items():
    array = np.asarray(jax.device_get(value))
    if array.dtype == object:
      raise ValueError(f'{key} is not a numeric array (dtype object).')
    if array.dtype.name == 'bfloat16':
      array = array.astype(np.float32)
    arrays[key] = array
  path = os.fspath(path)
  if not paths.is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with paths.atomic_writer(path) as f:
    np.savez(f, **arrays)
