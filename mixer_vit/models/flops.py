"""Matrix-multiply FLOPs of one forward pass on one image, counted by hand.

FLOPs are 2 x multiply-adds of the matrix products: patch embedding, q/k/v/out projections,
attention scores and mixing, MLPs (or a Mixer's token- and channel-mixing MLPs), the pooling head
and the classifier. Norms, softmax, activations and biases are not counted; XLA's own count of a
compiled model is within a few per cent above (``mixer_vit.benchmark`` reports both). One count
serves the benchmark's throughput figures and the Dynamic ViT cascade's cost per image
(``models.dvt``).
"""

from __future__ import annotations

from typing import Any

from mixer_vit.models import geometry
from mixer_vit.runtime import sizes


def forward_flops(config: Any, image_size: Any = None) -> float | None:
  """FLOPs of a plain ViT or Mixer of `config` on one image of `image_size` (default the
  config's); None for the families and hybrids it does not cover (a ResNet stem, ResNets)."""
  if config.family not in ('vit', 'mixer') or config.get('resnet'):
    return None
  ph, pw = sizes.pair(config.patches.size, 'patches.size')
  rows, cols = geometry.token_grid(config, image_size)
  n = rows * cols
  d = config.hidden_size
  macs = n * ph * pw * 3 * d  # Patch embedding.
  if config.family == 'mixer':
    per_layer = 2 * d * n * config.tokens_mlp_dim + 2 * n * d * config.channels_mlp_dim
    macs += config.num_blocks * per_layer
  else:
    t = n + (1 if config.classifier == 'token' else 0)
    m = config.transformer.mlp_dim
    # q, k, v and out projections; attention scores and mixing; the MLP.
    macs += config.transformer.num_layers * (4 * t * d * d + 2 * t * t * d + 2 * t * d * m)
    if config.classifier == 'map':  # One query: q, k/v of every token, scores, mix, out, MLP.
      macs += d * d + 2 * n * d * d + 2 * n * d + d * d + 2 * d * m
    if config.get('representation_size'):
      macs += d * config.representation_size
      d = config.representation_size
  macs += d * config.num_classes
  return 2.0 * macs
