r"""CIFAR-10 from scratch with a plain ViT, for the "How Do Vision Transformers Work?" comparisons.

  python -m mixer_vit.main --config=configs/cifar10_vit.py --workdir=workdirs/cifar10_vit
  python -m mixer_vit.main --config=configs/cifar10_vit.py:epochs=3 \
      --config.dataset=/data/cifar10 --workdir=workdirs/cifar10_vit_probe

The model is a ViT-Ti-like encoder on 4x4 patches (8x8 = 64 tokens at 32 px): width 192, 3 heads,
MLP 768, 6 layers, average pooling (2.69 M parameters). Everything else is configs/cifar10.py's
recipe (data, augmentation, AdamW one-cycle cosine, mixed precision), so that the ViT, the hybrid,
the ResNet, the AlterNet and the Mixer (configs/cifar10_{resnet,alternet,mixer}.py) differ only in
the model.

Measured with ``:epochs=2`` (seed 0; 2-core Intel Xeon, one device, other jobs sharing the CPU;
2026-12-04): **44.36 %** test accuracy (top-5 91.50 %) in 14m27s of training. The five CIFAR-10
comparison models side by side, with the paper's analyses: docs/how_do_vits_work.md. The 35-epoch
default is not measured for this model.
"""

import os

from mixer_vit.training import config_utils


def get_config(arg=None):
  """``arg``: ``epochs=N`` (default 35, as configs/cifar10.py)."""
  recipe = config_utils.load_config_module(os.path.join(os.path.dirname(__file__), 'cifar10.py'))
  c = recipe.for_model('testing', arg)
  c.model.patches = {'size': (4, 4)}
  c.model.hidden_size = 192
  c.model.transformer = {'num_layers': 6, 'mlp_dim': 768, 'num_heads': 3}
  c.model.classifier = 'gap'
  return c
