"""What every analysis shares: the checkpoint with its preprocessing, the examples, batching over
all devices, the output files.

A checkpoint is loaded as `mixer_vit.infer` and `mixer_vit.evaluate` load it (a workdir brings its
model, latest parameters, data set and `pp_test`; an `.npz` needs `--model` and `--dataset`); the
examples are the first N of the split in the evaluation pipeline's order, preprocessed for the
model (values in [-1, 1]). Models are analysed with their layers unrolled (`scan=False`,
`remat=False`: the same numbers) so that every block can be observed from outside, and in float32
(`unrolled`).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit import cli
from mixer_vit import data
from mixer_vit import evaluate
from mixer_vit import infer
from mixer_vit import models
from mixer_vit.models import params_io
from mixer_vit.runtime import parallel
from mixer_vit.runtime import paths


@dataclasses.dataclass
class Subject:
  """A trained model, its parameters and the examples it is analysed on."""

  model_config: Any
  model: Any  # flax module with unrolled layers
  params: Any  # host arrays, unstacked
  images: np.ndarray  # (N, H, W, 3) float32, preprocessed
  labels: np.ndarray  # (N,) int class indices
  source: str
  dataset: str
  split: str

  @property
  def family(self) -> str:
    return str(self.model_config.family)

  def first(self, count: int) -> Subject:
    """The same model on only the first `count` examples (one load serves several analyses)."""
    return dataclasses.replace(self, images=self.images[:count], labels=self.labels[:count])

  def describe(self) -> dict[str, Any]:
    return {
      'checkpoint': self.source,
      'model': str(self.model_config.name),
      'family': self.family,
      'dataset': self.dataset,
      'split': self.split,
      'examples': int(len(self.labels)),
      'image_size': list(self.images.shape[1:3]),
    }


def unrolled(model_config: Any, params: Any) -> tuple[Any, Any, Any]:
  """(config, module, params) with the layers as a Python loop, no remat, and float32 throughout
  (a model trained in mixed precision is analysed in float32: second derivatives and small
  perturbations need more than bfloat16's 8 bits)."""
  config = model_config.copy_and_resolve_references()
  with config.unlocked():
    config.scan = False
    config.remat = False
    config.remat_policy = 'nothing'
    config.dtype = 'float32'
    config.matmul_dtype = None
  params = params_io.unwrap(params)
  if params_io.is_stacked(params):
    params = params_io.unstack_layers(params)
  return config, models.build_model(config), params


def load_subject(
  checkpoint: str,
  model: str | None = None,
  *,
  dataset: str | None = None,
  data_dir: str | None = None,
  split: str | None = None,
  pp: str | None = None,
  examples: int = 512,
  ema: bool = False,
  training_data: bool = False,
  mesh: Any = None,
) -> Subject:
  """The checkpoint's model and the first `examples` examples of `split` (module docstring);
  without `split`, the config's test split, or with `training_data` its train split (still with
  the evaluation preprocessing: no augmentation)."""
  classifier = infer.load_classifier(checkpoint, model, ema=ema)
  config = evaluate.data_config(classifier, dataset, data_dir, pp)
  mesh = mesh or parallel.make_mesh()
  with config.unlocked():
    if split:
      config.test_split = split
    elif training_data:
      config.test_split = config.train_split
    config.eval_batch_size = max(mesh.size, min(256, examples) // mesh.size * mesh.size)
  info = data.get_info(config)
  if info.num_classes != classifier.num_classes:
    raise ValueError(
      f'the data set {config.dataset!r} has {info.num_classes} classes but the checkpoint '
      f'{checkpoint} has {classifier.num_classes}; pass the --dataset it was trained on'
    )
  images, labels = take_examples(data.make_eval_iterator(config, mesh), examples)
  if images.shape[1:3] != tuple(classifier.image_size):
    raise ValueError(
      f'the preprocessing gives {images.shape[1:3]} images but {checkpoint} was trained at '
      f'{tuple(classifier.image_size)}; pass --pp with a resize to that size'
    )
  model_config, module, params = unrolled(classifier.model_config, classifier.params)
  return Subject(
    model_config=model_config,
    model=module,
    params=jax.device_get(params),
    images=images,
    labels=labels,
    source=checkpoint,
    dataset=str(config.dataset),
    split=str(config.test_split),
  )


def take_examples(batches: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` real (unmasked) examples of an evaluation iterator, on the host."""
  if count < 1:
    raise ValueError(f'--examples must be at least 1, got {count}')
  images, labels, have = [], [], 0
  for batch in batches:
    mask, x, y = parallel.to_host((batch['mask'], batch['image'], batch['labels']))
    mask = np.asarray(mask, bool)
    images.append(np.asarray(x, np.float32)[mask])
    labels.append(np.argmax(np.asarray(y), axis=-1)[mask])
    have += int(mask.sum())
    if have >= count:
      break
  return np.concatenate(images)[:count], np.concatenate(labels)[:count]


# ----------------------------------------------------------------------------------------------
# Batching over every device.


def padded_batches(num: int, batch_size: int, mesh: Any):
  """(start, stop, padded size): fixed-size batches (a multiple of the device count)."""
  size = max(mesh.size, -(-batch_size // mesh.size) * mesh.size)
  for start in range(0, num, size):
    yield start, min(start + size, num), size


def sharded_sums(
  fn: Callable[..., Any],
  params: Any,
  arrays: tuple[np.ndarray, ...],
  *,
  batch_size: int,
  mesh: Any = None,
  extra: tuple[np.ndarray, ...] = (),
) -> Any:
  """Sums over all examples of `fn(params, *batch_arrays, mask, *extra)`, a jitted function
  returning per-batch sums (it must weight its per-example terms by `mask`).

  The batch (every array of `arrays`, split along its first axis) is sharded over all devices;
  `params` and `extra` are replicated. The last batch is padded with masked-out rows.
  """
  mesh = mesh or parallel.make_mesh()
  step = _sharded_step(fn, len(arrays), len(extra), mesh)
  params = parallel.replicate(params, mesh)
  extra = tuple(parallel.replicate(e, mesh) for e in extra)
  total = None
  num = len(arrays[0])
  for start, stop, size in padded_batches(num, batch_size, mesh):
    chunk = []
    for a in arrays:
      piece = np.zeros((size, *a.shape[1:]), a.dtype)
      piece[: stop - start] = a[start:stop]
      chunk.append(piece)
    mask = np.zeros((size,), np.float32)
    mask[: stop - start] = 1.0
    out = step(params, *chunk, mask, *extra)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  return jax.device_get(total)


@functools.lru_cache(maxsize=16)
def _sharded_step(fn: Callable[..., Any], num_arrays: int, num_extra: int, mesh: Any):
  """`fn` jitted for `sharded_sums`, once per function (e.g. every point of a landscape)."""
  repl, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(
    fn,
    in_shardings=(repl,) + (split,) * (num_arrays + 1) + (repl,) * num_extra,
    out_shardings=repl,
  )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels (float32)."""
  logits = logits.astype(jnp.float32)
  return (
    jax.nn.logsumexp(logits, axis=-1)
    - jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  )


def loss_and_correct_sums(model: Any) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """`(params, images, labels, mask) -> (sum of losses, number correct)` over the mask."""

  def fn(params, images, labels, mask):
    logits = model.apply({'params': params}, images, train=False)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(cross_entropy(logits, labels) * mask), jnp.sum(correct * mask)

  return fn


# ----------------------------------------------------------------------------------------------
# Output files.


def json_path(out: str) -> str:
  """The JSON numbers beside the picture: PLOT.png -> PLOT.json."""
  return os.path.splitext(out)[0] + '.json'


def json_is_ours(path: str) -> bool:
  """Whether ``path`` is a JSON file an analysis wrote (its ``software`` entry)."""
  try:
    with open(path, encoding='utf-8') as f:
      return cli.is_ours(json.load(f).get('software'))
  except (OSError, ValueError, AttributeError):
    return False


def refuse_existing_outputs(out: str, overwrite: bool) -> None:
  """Stops before any work when the picture or its JSON would replace a file: a user's file
  never, an earlier analysis output only with ``--overwrite`` (``cli.check_output``)."""
  cli.check_output(out, '--out', overwrite=overwrite, ours=cli.png_is_ours, example='plot.png')
  cli.check_output(json_path(out), '--out', overwrite=overwrite, ours=json_is_ours)


def write_outputs(out: str, figure: Any, result: dict[str, Any]) -> tuple[str, str]:
  """Writes the picture to `out` (PNG, marked as ours) and the numbers to `json_path(out)`, each
  complete or not at all."""
  from matplotlib import pyplot as plt  # noqa: PLC0415  # Imported by `figure` already.

  with paths.staged_path(out) as staged:
    figure.savefig(staged, format='png', dpi=120, metadata={'Software': cli.SOFTWARE})
  plt.close(figure)
  with paths.staged_path(json_path(out)) as staged:
    with open(staged, 'w', encoding='utf-8') as f:
      f.write(json.dumps({'software': cli.SOFTWARE, **result}, indent=1) + '\n')
  return out, json_path(out)


# Colours and markers of the block kinds in the pictures.
KIND_STYLE = {
  'input': ('black', 'x'),
  'conv': ('tab:blue', 's'),
  'attention': ('tab:red', 'o'),
  'token_mixing': ('tab:purple', 'D'),
  'mlp': ('tab:green', '^'),
}


def plot_by_depth(ax, rows: list[dict[str, Any]], key: str) -> None:
  """``row[key]`` against normalised depth: a grey line through all blocks, each block kind
  marked in its ``KIND_STYLE``, with a legend."""
  ax.plot([r['depth'] for r in rows], [r[key] for r in rows], color='0.6', zorder=1)
  for kind, (colour, marker) in KIND_STYLE.items():
    these = [r for r in rows if r['kind'] == kind]
    if these:
      ax.scatter(
        [r['depth'] for r in these],
        [r[key] for r in these],
        color=colour,
        marker=marker,
        label=kind,
        zorder=2,
      )
  ax.set_xlabel('normalised depth')
  ax.legend()


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
  """A new figure with `ncols` axes side by side (pyplot imported only when drawing). A command
  draws off screen (Agg); where pyplot is already in use (a notebook) its backend is kept."""
  import matplotlib  # noqa: PLC0415  # pyplot only when drawing; the backend must be set first.

  if 'matplotlib.pyplot' not in sys.modules:
    matplotlib.use('Agg', force=False)
  from matplotlib import pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
  return fig, list(axes[0])


def title(subject_info: dict[str, Any]) -> str:
  return (
    f'{subject_info["model"]} ({subject_info["family"]}), {subject_info["examples"]} examples of '
    f'{os.path.basename(str(subject_info["dataset"]).rstrip("/"))}:{subject_info["split"]}'
  )
