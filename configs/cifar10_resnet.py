r"""CIFAR-10 from scratch with the pure ResNet of "How Do Vision Transformers Work?" comparisons.

  python -m mixer_vit.main --config=configs/cifar10_resnet.py --workdir=workdirs/cifar10_resnet
  python -m mixer_vit.main --config=configs/cifar10_resnet.py:epochs=3 \
      --config.dataset=/data/cifar10 --workdir=workdirs/cifar10_resnet_probe

The model is ``ResNet-S`` (``models.resnet``): the CIFAR-10 hybrid's stem (configs/cifar10.py: 3x3
root + max-pool, half-width BiT bottleneck units, GroupNorm with 8 groups) with two units per stage
and a third stage at 4x4, the hybrid's token resolution, then global average pooling and the head
(0.87 M parameters). Everything else is the hybrid's recipe (data, augmentation, AdamW one-cycle
cosine, mixed precision), so that the two differ only in the model; ``configs/cifar10_alternet.py``
is the same with MSA units.

Measured with ``:epochs=2`` (seed 0; 2-core Intel Xeon, one device, other jobs sharing the CPU;
2026-12-04): **54.41 %** test accuracy (top-5 94.53 %) in 10m33s of training. The five CIFAR-10
comparison models side by side, with the paper's analyses: docs/how_do_vits_work.md. The 35-epoch
default is not measured for this model.
"""

import os

from mixer_vit.training import config_utils


def get_config(arg=None):
  """``arg``: ``epochs=N`` (default 35, as configs/cifar10.py)."""
  recipe = config_utils.load_config_module(os.path.join(os.path.dirname(__file__), 'cifar10.py'))
  return recipe.for_model('ResNet-S', arg)
