r"""Attention maps for ViT: attention rollout and per-head maps, as arrays and as PNG overlays.

Rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers") follows how much of
each output token comes from each input patch when the residual connections are counted: per
layer, average the heads, add the identity (the residual path), renormalise the rows, and multiply
the layers together. Its rows stay probability distributions over the input tokens.

The arrays are those ``models.apply_with_intermediates`` returns: ``'attention'`` shaped
``(num_layers, B, heads, T, T)`` with ``T = prefix + grid_h * grid_w`` (``prefix`` is 1 for the
``token`` classifier's class token, 0 for ``gap``). For the ``token`` classifier the class token's
row gives the map; otherwise the mean over all rows does.

Command::

  python -m mixer_vit.attention --checkpoint=WORKDIR|FILE.npz [--model=NAME] \
      [--out_dir=attention_maps] [--summary=FILE.png] [--layer=-1] IMAGE_OR_FOLDER...

writes, per image, a rollout overlay (``OUT_DIR/<name>_rollout.png``) and a figure of per-head
maps for one layer (``OUT_DIR/<name>_heads.png``). Every path is checked before the model runs: an
existing picture is replaced only with ``--overwrite`` and only when this command wrote it
(``cli.check_output``); a file of the user's is never replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import os
import sys
from typing import Any

import jax
from matplotlib import colormaps
import numpy as np
from PIL import Image
from PIL import PngImagePlugin

from mixer_vit import cli
from mixer_vit import infer
from mixer_vit import models
from mixer_vit.data import preprocess
from mixer_vit.runtime import paths

# Why a checkpoint of another family gets no attention maps, per family.
NOT_A_VIT = {
  'mixer': 'an MLP-Mixer: it has no attention',
  'resnet': 'a ResNet: it has no attention',
  'alternet': 'an AlterNet: its attention blocks see a feature map, not patches of the image',
  'dvt': "a Dynamic ViT cascade: its stages' attention maps are not drawn",
}

# ----------------------------------------------------------------------------------------------
# Array maths (numpy or jax arrays in, numpy out).


def rollout(attention: Any, head_fusion: str = 'mean') -> np.ndarray:
  """Joint attention over all layers: ``(num_layers, B, heads, T, T)`` -> ``(B, T, T)``.

  Row ``i`` of the result is a distribution over input tokens: how much of output token ``i``
  flows from each input token through attention and the residual path.

  Args:
    attention: per-layer attention weights, rows summing to 1 (softmax over keys).
    head_fusion: how heads are combined per layer: 'mean' (the paper), 'max' or 'min'.
  """
  attention = np.asarray(attention, np.float64)
  if attention.ndim != 5 or attention.shape[-1] != attention.shape[-2]:
    raise ValueError(
      f'attention must be shaped (num_layers, B, heads, T, T); got {attention.shape}. '
      "Use the 'attention' entry of models.apply_with_intermediates(model, params, images)."
    )
  fuse = {'mean': np.mean, 'max': np.max, 'min': np.min}.get(head_fusion)
  if fuse is None:
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min'; got {head_fusion!r}")
  num_tokens = attention.shape[-1]
  joint = None
  for layer in attention:  # (B, heads, T, T)
    a = fuse(layer, axis=1) + np.eye(num_tokens)
    a = a / a.sum(axis=-1, keepdims=True)
    # Later layers act on the outputs of earlier ones: R_l = A_l @ R_{l-1}.
    joint = a if joint is None else a @ joint
  return joint


def num_prefix_tokens(num_tokens: int, grid: tuple[int, int]) -> int:
  """Tokens in front of the patch tokens (class token), from the token count and the grid."""
  prefix = num_tokens - grid[0] * grid[1]
  if prefix < 0:
    raise ValueError(f'{num_tokens} tokens cannot hold a {grid[0]}x{grid[1]} patch grid')
  return prefix


def token_map(matrix: np.ndarray, grid: tuple[int, int], classifier: str) -> np.ndarray:
  """Reads a spatial map out of ``(..., T, T)`` token-to-token weights: ``(..., gh, gw)``.

  ``token`` classifier: the class token's row over the patches. Any other (``gap``, ...): the mean
  of all rows over the patches. The map is renormalised to sum to 1 over the patches.
  """
  matrix = np.asarray(matrix, np.float64)
  prefix = num_prefix_tokens(matrix.shape[-1], grid)
  if classifier == 'token' and prefix >= 1:
    row = matrix[..., 0, prefix:]
  else:
    row = matrix[..., prefix:, prefix:].mean(axis=-2)
  row = row / np.maximum(row.sum(axis=-1, keepdims=True), 1e-12)
  return row.reshape(row.shape[:-1] + tuple(grid))


def rollout_map(
  attention: Any, grid: tuple[int, int], classifier: str = 'token', head_fusion: str = 'mean'
) -> np.ndarray:
  """Attention rollout as a map over the patch grid: ``(B, gh, gw)``, each summing to 1."""
  return token_map(rollout(attention, head_fusion), grid, classifier)


def head_maps(
  attention: Any, grid: tuple[int, int], classifier: str = 'token', layer: int = -1
) -> np.ndarray:
  """Per-head maps of one layer (no rollout): ``(B, heads, gh, gw)``, each summing to 1."""
  attention = np.asarray(attention)
  if attention.ndim != 5:
    raise ValueError(f'attention must be (num_layers, B, heads, T, T); got {attention.shape}')
  num_layers = attention.shape[0]
  if not -num_layers <= layer < num_layers:
    raise ValueError(
      f'layer {layer} out of range for {num_layers} layers '
      f'(use 0..{num_layers - 1} or negative from the end)'
    )
  return token_map(attention[layer], grid, classifier)


def patch_grid(
  num_tokens: int, image_hw: tuple[int, int], classifier: str = 'token', model_config: Any = None
) -> tuple[int, int]:
  """The patch grid ``(gh, gw)`` that ``num_tokens`` tokens of an ``image_hw`` input lie on.

  With a model config the grid is the model's own (``models.token_grid``: the patch size and, for
  hybrids, the ResNet stem's output size); it is checked against the token count. Otherwise, or
  when that does not fit, the factorisation of the patch-token count closest to the image's aspect
  ratio is used.
  """
  h, w = image_hw
  prefix = 1 if classifier in ('token', 'token_unpooled') else 0
  num_patches = num_tokens - prefix
  if model_config is not None:
    grid = tuple(models.token_grid(model_config, (h, w)))
    if grid[0] * grid[1] == num_patches:
      return grid
  best = None
  for gh in range(1, num_patches + 1):
    if num_patches % gh:
      continue
    gw = num_patches // gh
    err = abs(math.log((gh / gw) / (h / w)))
    if best is None or err < best[0]:
      best = (err, (gh, gw))
  if best is None:
    raise ValueError(f'no patch grid for {num_tokens} tokens ({classifier!r} classifier)')
  return best[1]


# ----------------------------------------------------------------------------------------------
# From a model.


_APPLY_CACHE: dict[int, tuple[Any, Any]] = {}


def _jitted_apply(model: Any):
  """One jitted ``models.apply_with_intermediates`` per model (compiled once per shape)."""
  entry = _APPLY_CACHE.get(id(model))
  if entry is None or entry[0] is not model:
    fn = jax.jit(lambda p, x: models.apply_with_intermediates(model, p, x))
    entry = _APPLY_CACHE[id(model)] = (model, fn)
  return entry[1]


def compute(
  model: Any,
  params: Any,
  images: Any,
  model_config: Any,
  layer: int = -1,
  head_fusion: str = 'mean',
) -> dict[str, np.ndarray]:
  """Runs a ViT on preprocessed images (B, H, W, 3) and returns its attention maps.

  Returns a dict of numpy arrays: ``'rollout'`` (B, gh, gw), ``'heads'`` (B, heads, gh, gw) for
  ``layer``, ``'attention'`` (num_layers, B, heads, T, T) and ``'logits'`` (B, num_classes).
  """
  if model_config.family != 'vit':
    raise ValueError(
      f'{model_config.name} is a {model_config.family} model; attention maps '
      'need a ViT (MLP-Mixer has no attention)'
    )
  images = np.asarray(images, np.float32)
  logits, inter = _jitted_apply(model)(params, images)
  att = np.asarray(inter['attention'], np.float32)
  grid = patch_grid(att.shape[-1], images.shape[1:3], model_config.classifier, model_config)
  return {
    'rollout': rollout_map(att, grid, model_config.classifier, head_fusion),
    'heads': head_maps(att, grid, model_config.classifier, layer),
    'attention': att,
    'logits': np.asarray(logits, np.float32),
  }


# ----------------------------------------------------------------------------------------------
# Pictures.


def overlay(
  image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.55, cmap: str = 'inferno'
) -> np.ndarray:
  """Blends a (gh, gw) map, upsampled smoothly to the image, over an RGB image: uint8 (H, W, 3).

  ``image`` is uint8 or float in [-1, 1] or [0, 1]; the map is scaled to [0, 1] by its range.
  """
  rgb = to_uint8(image)
  h, w = rgb.shape[:2]
  m = np.asarray(heatmap, np.float32)
  m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
  m = np.asarray(Image.fromarray(m, mode='F').resize((w, h), Image.BICUBIC))
  m = np.clip(m, 0.0, 1.0)
  colour = colormaps[cmap](m)[..., :3]
  out = (1 - alpha) * (rgb / 255.0) + alpha * colour
  return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """An RGB image as uint8 (H, W, 3) from uint8, [0, 1] floats or [-1, 1] floats."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  if image.dtype == np.uint8:
    return image
  image = image.astype(np.float32)
  if image.min() < 0:
    image = (image + 1.0) / 2.0
  return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def save_overlay_png(path: str, image: np.ndarray, heatmap: np.ndarray, **kwargs) -> str:
  """Writes ``overlay(image, heatmap)`` as a PNG the size of the image; returns the path."""
  info = PngImagePlugin.PngInfo()
  info.add_text('Software', cli.SOFTWARE)
  with paths.staged_path(path) as staged:
    Image.fromarray(overlay(image, heatmap, **kwargs)).save(staged, format='PNG', pnginfo=info)
  return path


def save_figure_png(
  path: str,
  image: np.ndarray,
  rollout_hw: np.ndarray,
  heads: np.ndarray | None = None,
  title: str | None = None,
  layer: int | None = None,
) -> str:
  """A figure: input, rollout overlay and (optionally) one overlay per head of a layer."""
  import matplotlib  # noqa: PLC0415  # pyplot only when drawing; the backend must be set first.

  matplotlib.use('Agg', force=False)
  from matplotlib import pyplot as plt  # noqa: PLC0415

  rgb = to_uint8(image)
  panels = [('input', rgb), ('rollout', overlay(rgb, rollout_hw))]
  if heads is not None:
    for i, m in enumerate(heads):
      panels.append(
        (f'layer {layer} head {i}' if layer is not None else f'head {i}', overlay(rgb, m))
      )
  cols = min(len(panels), 6)
  rows = math.ceil(len(panels) / cols)
  h, w = rgb.shape[:2]
  size = 2.2
  fig, axes = plt.subplots(
    rows,
    cols,
    figsize=(cols * size * w / max(h, w) + 0.2, rows * (size * h / max(h, w) + 0.35)),
    squeeze=False,
  )
  for ax in axes.flat:
    ax.axis('off')
  for ax, (name, picture) in zip(axes.flat, panels):
    ax.imshow(picture)
    ax.set_title(name, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  with paths.staged_path(path) as staged:
    fig.savefig(staged, format='png', dpi=110, metadata={'Software': cli.SOFTWARE})
  plt.close(fig)
  return path


def save_summary_png(
  path: str,
  images: Sequence[np.ndarray],
  maps: Sequence[np.ndarray],
  titles: Sequence[str] | None = None,
  columns: int = 4,
) -> str:
  """A figure of (image, rollout overlay) pairs for several images, e.g. for documentation."""
  import matplotlib  # noqa: PLC0415  # pyplot only when drawing; the backend must be set first.

  matplotlib.use('Agg', force=False)
  from matplotlib import pyplot as plt  # noqa: PLC0415

  n = len(images)
  columns = max(1, min(columns, n))
  rows = math.ceil(n / columns)
  fig, axes = plt.subplots(
    rows, 2 * columns, figsize=(2 * columns * 1.6, rows * 1.85), squeeze=False
  )
  for ax in axes.flat:
    ax.axis('off')
  for i, (image, m) in enumerate(zip(images, maps)):
    r, c = divmod(i, columns)
    rgb = to_uint8(image)
    axes[r, 2 * c].imshow(rgb)
    axes[r, 2 * c + 1].imshow(overlay(rgb, m))
    if titles:
      axes[r, 2 * c].set_title(titles[i], fontsize=8)
      axes[r, 2 * c + 1].set_title('rollout', fontsize=8)
  fig.tight_layout(pad=0.3)
  with paths.staged_path(path) as staged:
    fig.savefig(staged, format='png', dpi=120, metadata={'Software': cli.SOFTWARE})
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------
# Command line.


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
  """Enlarges small images (e.g. 32x32) for viewing, keeping the aspect ratio."""
  h, w = image.shape[:2]
  if min(h, w) >= min_side:
    return image
  scale = min_side / min(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def display_image(classifier: Any, data: bytes, model_input: np.ndarray) -> np.ndarray:
  """The picture to draw the map on: the decoded file when the preprocessing only resizes it
  (the map covers the whole file), else the model's input (e.g. after a central crop)."""
  ops = [name for name, _, _ in preprocess.parse(classifier.pp)]
  if any(
    op in ('central_crop', 'random_crop', 'inception_crop', 'resize_small', 'flip_lr') for op in ops
  ):
    return to_uint8(model_input)
  decode = preprocess.get_preprocess_fn('decode', max_pixels=classifier.max_image_pixels)
  return np.asarray(decode({'image': data})['image'])


# The two pictures per image: <stem>_rollout.png and <stem>_heads.png.
OUTPUT_KINDS = ('rollout', 'heads')


def plan_outputs(
  files: Sequence[str], out_dir: str, summary: str | None, overwrite: bool
) -> dict[str, tuple[str, str]]:
  """``{image: (rollout path, heads path)}``, after checking every path the command will write
  (``cli.check_output``): raises ``cli.CommandError`` before anything is computed."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise cli.CommandError(f'--out_dir={out_dir} is a file; name a folder to write the maps in')
  planned: dict[str, tuple[str, str]] = {}
  writers: dict[str, str] = {}  # output path -> what writes it
  for path in files:
    stem = os.path.splitext(os.path.basename(path))[0]
    planned[path] = tuple(os.path.join(out_dir, f'{stem}_{kind}.png') for kind in OUTPUT_KINDS)
    writers.update({out: path for out in planned[path] if out not in writers})
    for out in planned[path]:
      if writers[out] != path:
        raise cli.CommandError(
          f'{writers[out]} and {path} would both write {out}; rename one or run them separately'
        )
  for out in writers:
    cli.check_output(out, '--out_dir', overwrite=overwrite, ours=cli.png_is_ours)
  if summary:
    if os.path.abspath(summary) in {os.path.abspath(out) for out in writers}:
      raise cli.CommandError(f'--summary={summary} is also the map of an image; choose another')
    cli.check_output(
      summary, '--summary', overwrite=overwrite, ours=cli.png_is_ours, example='summary.png'
    )
  return planned


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(
    prog='python -m mixer_vit.attention',
    description='Attention rollout and per-head maps of a ViT, as PNG overlays.',
  )
  parser.add_argument('images', nargs='+', metavar='IMAGE_OR_FOLDER')
  cli.add_checkpoint_flags(parser, 'labels', 'resolution', 'pp', 'max_image_pixels')
  parser.add_argument('--layer', type=int, default=-1, help='layer of the per-head maps')
  parser.add_argument('--head_fusion', choices=('mean', 'max', 'min'), default='mean')
  parser.add_argument(
    '--out_dir',
    default='attention_maps',
    help='writes <name>_rollout.png and <name>_heads.png per image here',
  )
  parser.add_argument('--summary', help='also write one figure of all images and rollouts')
  parser.add_argument(
    '--overwrite',
    action='store_true',
    help='replace the earlier maps of these images (only pictures this command wrote)',
  )
  parser.add_argument(
    '--min_side',
    type=cli.positive_int,
    default=224,
    help='small images are enlarged to this shorter side for viewing',
  )
  parser.add_argument('--alpha', type=float, default=0.55, help='opacity of the map')
  args = parser.parse_args(argv)

  files = infer.list_images(args.images)
  try:
    if not files:
      raise cli.CommandError(
        f'no image files ({", ".join(infer.IMAGE_EXTENSIONS)}) in {" ".join(args.images)}'
      )
    if not 0 <= args.alpha <= 1:
      raise cli.CommandError(f'--alpha={args.alpha}: the opacity must be in [0, 1]')
    planned = plan_outputs(files, args.out_dir, args.summary, args.overwrite)
    classifier = infer.load_from_args(args)
    family = classifier.model_config.family
    if family != 'vit':
      raise cli.CommandError(
        f'{classifier.model_config.name} is {NOT_A_VIT.get(family, f"a {family} model")}; '
        'attention maps need a ViT checkpoint'
      )
    num_layers = classifier.model_config.transformer.num_layers
    if not -num_layers <= args.layer < num_layers:
      raise cli.CommandError(
        f'--layer={args.layer}: the model has {num_layers} layers; use 0..{num_layers - 1} '
        '(or negative, from the end)'
      )
  except cli.CommandError as e:
    return cli.fail(e)
  summary_images, summary_maps, summary_titles = [], [], []
  failed = 0
  for path in files:
    try:
      with open(path, 'rb') as f:
        data = f.read()
      x = classifier.preprocess(data)
      maps = compute(
        classifier.model,
        classifier.params,
        x[None],
        classifier.model_config,
        layer=args.layer,
        head_fusion=args.head_fusion,
      )
    except Exception as e:  # pylint: disable=broad-except  # Report and go on with the rest.
      failed += 1
      print(f'error: {path}: {infer.error_text(e)}', file=sys.stderr)
      continue
    logits = maps['logits'][0]
    probs = np.asarray(
      jax.nn.sigmoid(logits) if classifier.activation == 'sigmoid' else jax.nn.softmax(logits)
    )
    top = int(np.argmax(probs))
    title = f'{classifier.class_name(top)} ({probs[top]:.0%})'
    picture = upscale(display_image(classifier, data, x), args.min_side)
    rollout_path, heads_path = planned[path]
    rollout_path = save_overlay_png(
      rollout_path,
      picture,
      maps['rollout'][0],
      alpha=args.alpha,
    )
    num_layers = maps['attention'].shape[0]
    layer = args.layer % num_layers
    heads_path = save_figure_png(
      heads_path,
      picture,
      maps['rollout'][0],
      maps['heads'][0],
      title=f'{os.path.basename(path)}: {title}',
      layer=layer,
    )
    print(f'{path}: {title}\n  {rollout_path}\n  {heads_path}', flush=True)
    summary_images.append(picture)
    summary_maps.append(maps['rollout'][0])
    summary_titles.append(title)
  if args.summary and summary_images:
    print(save_summary_png(args.summary, summary_images, summary_maps, summary_titles))
  if failed:
    print(f'{failed} of {len(files)} files failed', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
