r"""Attention maps for ViT: attention rollout and per-head maps, as arrays and as PNG overlays.

Rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers") follows how much of
each output token comes from each input patch when the residual connections are counted: per
layer, average the heads, add the identity (the residual path), renormalise the rows, and multiply
the layers together. Its rows stay probability distributions over the input tokens.

The arrays are those the models return with ``return_intermediates=True``: ``'attention'`` shaped
``(num_layers, B, heads, T, T)`` with ``T = prefix + grid_h * grid_w`` (``prefix`` is 1 for the
``token`` classifier's class token, 0 for ``gap``). For the ``token`` classifier the class token's
row gives the map; otherwise the mean over all rows does.

Command::

  python -m mixer_vit.attention --checkpoint=WORKDIR|FILE.npz [--model=NAME] \
      --out=attention.png [--layer=-1] IMAGE [IMAGE...]

writes, per image, a rollout overlay (``OUT``) and a figure of per-head maps for one layer
(``OUT`` with ``_heads`` before the extension).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Sequence

import numpy as np


# ----------------------------------------------------------------------------------------------
# Array maths (numpy or jax arrays in, numpy out).


def rollout(attention: Any, head_fusion: str = "mean") -> np.ndarray:
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
        f"attention must be shaped (num_layers, B, heads, T, T); got {attention.shape}. "
        "Use the 'attention' entry of model.apply(..., return_intermediates=True).")
  fuse = {"mean": np.mean, "max": np.max, "min": np.min}.get(head_fusion)
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
    raise ValueError(f"{num_tokens} tokens cannot hold a {grid[0]}x{grid[1]} patch grid")
  return prefix


def token_map(matrix: np.ndarray, grid: tuple[int, int], classifier: str) -> np.ndarray:
  """Reads a spatial map out of ``(..., T, T)`` token-to-token weights: ``(..., gh, gw)``.

  ``token`` classifier: the class token's row over the patches. Any other (``gap``, ...): the mean
  of all rows over the patches. The map is renormalised to sum to 1 over the patches.
  """
  matrix = np.asarray(matrix, np.float64)
  prefix = num_prefix_tokens(matrix.shape[-1], grid)
  if classifier == "token" and prefix >= 1:
    row = matrix[..., 0, prefix:]
  else:
    row = matrix[..., prefix:, prefix:].mean(axis=-2)
  row = row / np.maximum(row.sum(axis=-1, keepdims=True), 1e-12)
  return row.reshape(row.shape[:-1] + tuple(grid))


def rollout_map(attention: Any, grid: tuple[int, int], classifier: str = "token",
                head_fusion: str = "mean") -> np.ndarray:
  """Attention rollout as a map over the patch grid: ``(B, gh, gw)``, each summing to 1."""
  return token_map(rollout(attention, head_fusion), grid, classifier)


def head_maps(attention: Any, grid: tuple[int, int], classifier: str = "token",
              layer: int = -1) -> np.ndarray:
  """Per-head maps of one layer (no rollout): ``(B, heads, gh, gw)``, each summing to 1."""
  attention = np.asarray(attention)
  if attention.ndim != 5:
    raise ValueError(f"attention must be (num_layers, B, heads, T, T); got {attention.shape}")
  num_layers = attention.shape[0]
  if not -num_layers <= layer < num_layers:
    raise ValueError(f"layer {layer} out of range for {num_layers} layers "
                     f"(use 0..{num_layers - 1} or negative from the end)")
  return token_map(attention[layer], grid, classifier)


def patch_grid(num_tokens: int, image_hw: tuple[int, int], classifier: str = "token",
               model_config: Any = None) -> tuple[int, int]:
  """The patch grid ``(gh, gw)`` that ``num_tokens`` tokens of an ``image_hw`` input lie on.

  With a model config the grid is computed from the strides (the patch size, and for hybrids the
  ResNet stem's total stride, 'SAME' padding rounding up); it is checked against the token count.
  Otherwise, or when that does not fit, the factorisation of the patch-token count closest to
  the image's aspect ratio is used.
  """
  h, w = image_hw
  prefix = 1 if classifier == "token" else 0
  num_patches = num_tokens - prefix
  if model_config is not None:
    grid = _grid_from_config(model_config, (h, w))
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
    raise ValueError(f"no patch grid for {num_tokens} tokens ({classifier!r} classifier)")
  return best[1]


def _grid_from_config(model_config: Any, image_hw: tuple[int, int]) -> tuple[int, int]:
  """Patch grid from the strides: ResNet stem ('SAME', rounds up), then patches ('VALID')."""
  ph, pw = tuple(model_config.patches.size)
  h, w = image_hw
  resnet = model_config.get("resnet") if hasattr(model_config, "get") else None
  if resnet:
    # Root: stride-2 conv and stride-2 max pool; then stride 2 at every stage after the first.
    num_stages = len(tuple(resnet.get("num_layers", ()) or ()))
    for _ in range(2 + max(num_stages - 1, 0)):
      h, w = math.ceil(h / 2), math.ceil(w / 2)
  return h // ph, w // pw


# ----------------------------------------------------------------------------------------------
# Pictures.


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.55,
            cmap: str = "inferno") -> np.ndarray:
  """Blends a (gh, gw) map, upsampled smoothly to the image, over an RGB image: uint8 (H, W, 3).

  ``image`` is uint8 or float in [-1, 1] or [0, 1]; the map is scaled to [0, 1] by its range.
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgb = to_uint8(image)
  h, w = rgb.shape[:2]
  m = np.asarray(heatmap, np.float32)
  m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
  m = np.asarray(Image.fromarray(m, mode="F").resize((w, h), Image.BICUBIC))
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
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(overlay(image, heatmap, **kwargs)).save(path, format="PNG")
  return path


def save_figure_png(path: str, image: np.ndarray, rollout_hw: np.ndarray,
                    heads: np.ndarray | None = None, title: str | None = None,
                    layer: int | None = None) -> str:
  """A figure: input, rollout overlay and (optionally) one overlay per head of a layer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=False)
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  rgb = to_uint8(image)
  panels = [("input", rgb), ("rollout", overlay(rgb, rollout_hw))]
  if heads is not None:
    for i, m in enumerate(heads):
      panels.append((f"layer {layer} head {i}" if layer is not None else f"head {i}",
                     overlay(rgb, m)))
  cols = min(len(panels), 6)
  rows = math.ceil(len(panels) / cols)
  h, w = rgb.shape[:2]
  size = 2.2
  fig, axes = plt.subplots(rows, cols, figsize=(cols * size * w / max(h, w) + 0.2,
                                                rows * (size * h / max(h, w) + 0.35)),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (name, picture) in zip(axes.flat, panels):
    ax.imshow(picture)
    ax.set_title(name, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png", dpi=110)
  plt.close(fig)
  return path
