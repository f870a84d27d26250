"""FLOPs of one forward pass on one image, counted by hand.

FLOPs are 2 x multiply-adds of the matrix products and convolutions: a hybrid's or a ResNet's
convolutions, patch embedding, q/k/v/out projections, attention scores and mixing, MLPs (or a
Mixer's token- and channel-mixing MLPs), the pooling head and the classifier. Norms, softmax,
activations and biases are not counted; XLA's own count of a compiled model is a little above
(``mixer_vit.benchmark`` reports both). One count serves the benchmark's throughput figures and
the Dynamic ViT cascade's cost per image (``models.dvt``).
"""

from __future__ import annotations

from typing import Any

from mixer_vit.models import geometry
from mixer_vit.models import resnet
from mixer_vit.runtime import sizes


def forward_flops(config: Any, image_size: Any = None) -> float | None:
  """FLOPs of a ViT (R+ViT hybrids included), Mixer or ResNet of `config` on one image of
  `image_size` (default the config's); None for the families it does not cover (AlterNet, the
  Dynamic ViT cascade: `models.dvt.exit_flops`)."""
  if config.family not in ('vit', 'mixer', 'resnet'):
    return None
  h, w = sizes.pair(config.image_size if image_size is None else image_size, 'image_size')
  macs, channels = 0, 3
  if config.get('resnet'):  # A hybrid's stem, or the whole ResNet but its head.
    stem = config.resnet
    macs, _, channels = resnet.stem_macs(
      (h, w),
      stem.num_layers,
      stem.get('width_factor', 1.0),
      stem.get('root', resnet.DEFAULT_ROOT),
    )
  if config.family == 'resnet':
    return 2.0 * (macs + channels * config.num_classes)
  ph, pw = sizes.pair(config.patches.size, 'patches.size')
  rows, cols = geometry.token_grid(config, (h, w))
  n = rows * cols
  d = config.hidden_size
  macs += n * ph * pw * channels * d  # Patch embedding.
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
