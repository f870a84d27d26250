r"""CIFAR-10 from scratch with AlterNet (Park & Kim 2022): ``ResNet-S`` whose last unit of stages 2
and 3 is a multi-head self-attention unit.

  python -m mixer_vit.main --config=configs/cifar10_alternet.py --workdir=workdirs/cifar10_alternet
  python -m mixer_vit.main --config=configs/cifar10_alternet.py:epochs=3 \
      --config.dataset=/data/cifar10 --workdir=workdirs/cifar10_alternet_probe

The model is ``AlterNet-S`` (``models.alternet``): the stages of configs/cifar10_resnet.py's
``ResNet-S`` (16x16, 8x8, 4x4; two half-width BiT bottleneck units each) with the second unit of
stages 2 and 3 an MSA unit, global attention over the 8x8 and 4x4 feature maps with heads of width
32 (0.77 M parameters). The recipe is configs/cifar10.py's, as for the ResNet and the hybrid.

Measured with ``:epochs=2`` (seed 0; 2-core Intel Xeon, one device, other jobs sharing the CPU;
2026-12-04): **52.72 %** test accuracy (top-5 94.07 %) in 11m09s of training. The five CIFAR-10
comparison models side by side, with the paper's analyses: docs/how_do_vits_work.md. The 35-epoch
default is not measured for this model.
"""

import os

from mixer_vit.training import config_utils


def get_config(arg=None):
  """``arg``: ``epochs=N`` (default 35, as configs/cifar10.py)."""
  recipe = config_utils.load_config_module(os.path.join(os.path.dirname(__file__), 'cifar10.py'))
  return recipe.for_model('AlterNet-S', arg)
