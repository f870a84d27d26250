"""Token geometry: how many tokens a model makes from an image, and how many pixels each covers.

ViT patches the image, or the ResNet stem's output for hybrids (partial patches dropped); Mixer's
stem pads, so partial patches count.
"""

from __future__ import annotations

from typing import Any

from mixer_vit.models import resnet
from mixer_vit.runtime import sizes


def token_grid(config: Any, image_size: Any = None) -> tuple[int, int]:
  """(rows, cols) of the tokens a model of `config` makes from an (H, W) image.

  `image_size` defaults to the config's. ViT: patches of the image, or of the ResNet stem's
  output for hybrids, partial patches dropped ('VALID'). Mixer: its stem pads ('SAME'), so
  partial patches count.
  """
  h, w = sizes.pair(config.image_size if image_size is None else image_size, 'image_size')
  ph, pw = sizes.pair(config.patches.size, 'patches.size')
  if config.family == 'mixer':
    return -(-h // ph), -(-w // pw)
  if config.resnet is not None:
    root = config.resnet.get('root', resnet.DEFAULT_ROOT)
    h = resnet.stem_output_size(h, config.resnet.num_layers, root)
    w = resnet.stem_output_size(w, config.resnet.num_layers, root)
  return h // ph, w // pw


def pixels_per_token(config: Any) -> tuple[int, int]:
  """Input pixels per token along (H, W): patch size times the ResNet stem's stride."""
  ph, pw = sizes.pair(config.patches.size, 'patches.size')
  if config.family == 'mixer' or config.resnet is None:
    return ph, pw
  stride = resnet.stem_stride(
    config.resnet.num_layers, config.resnet.get('root', resnet.DEFAULT_ROOT)
  )
  return ph * stride, pw * stride
