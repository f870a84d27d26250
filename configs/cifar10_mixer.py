r"""CIFAR-10 from scratch with an MLP-Mixer, for the "How Do Vision Transformers Work?" comparisons.

  python -m mixer_vit.main --config=configs/cifar10_mixer.py --workdir=workdirs/cifar10_mixer
  python -m mixer_vit.main --config=configs/cifar10_mixer.py:epochs=3 \
      --config.dataset=/data/cifar10 --workdir=workdirs/cifar10_mixer_probe

The model is a Mixer on 4x4 patches (8x8 = 64 tokens at 32 px): width 192, token-mixing MLP 96,
channel-mixing MLP 768, 6 blocks (1.87 M parameters), the ViT of configs/cifar10_vit.py with token
mixing in place of attention. Everything else is configs/cifar10.py's recipe.

Measured with ``:epochs=2`` (seed 0; 2-core Intel Xeon, one device, other jobs sharing the CPU;
2026-12-04): **50.98 %** test accuracy (top-5 93.98 %) in 12m52s of training. The five CIFAR-10
comparison models side by side, with the paper's analyses: docs/how_do_vits_work.md. The 35-epoch
default is not measured for this model.
"""

import os

from mixer_vit.training import config_utils


def get_config(arg=None):
  """``arg``: ``epochs=N`` (default 35, as configs/cifar10.py)."""
  recipe = config_utils.load_config_module(os.path.join(os.path.dirname(__file__), 'cifar10.py'))
  c = recipe.for_model('testing-mixer', arg)
  c.model.patches = {'size': (4, 4)}
  c.model.hidden_size = 192
  c.model.num_blocks = 6
  c.model.tokens_mlp_dim = 96
  c.model.channels_mlp_dim = 768
  return c
