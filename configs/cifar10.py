r"""CIFAR-10 from scratch on a CPU: a small ResNet + ViT hybrid on the CIFAR-10 image folder.

  mkdir -p ~/data/cifar10 && tar xzf cifar10-jpeg.tar.gz -C ~/data/cifar10  # train/, test/
  python -m mixer_vit.main --config=configs/cifar10.py --workdir=workdirs/cifar10
  python -m mixer_vit.main --config=configs/cifar10.py:epochs=3 --config.dataset=/data/cifar10 \
      --workdir=workdirs/cifar10_probe

The folder is ``~/data/cifar10`` unless ``--config.dataset`` names another. A ViT needs many epochs
of heavy augmentation to learn CIFAR-10 from scratch; a convolutional stem supplies the locality
prior so that the epochs two CPU cores manage in an hour go far. The stem is a two-stage BiT ResNet
at half width (3x3 root conv + max-pool, one unit per stage at 16x16 and 8x8, GroupNorm with 8
groups), then 2x2 patches -> 4x4 tokens for a ViT-Ti-like encoder (width 192, 3 heads, MLP 768,
4 layers, average pooling). Pad-and-crop shifts, flips, label smoothing, AdamW with a one-cycle
cosine schedule, 35 epochs, mixed precision (bfloat16 products, float32 sums and parameters).

Measured (Intel Xeon with AMX, 2 cores, tcmalloc preloaded, 1 device, nothing else running; the
first command above, which is ``:epochs=35 --config.matmul_dtype=bfloat16``; one run per seed):
seed 0 **80.44 %** test accuracy (top-5 98.60 %) in 55m02s of training (compilation and
evaluations included, about 545 images/s; the first 5 minutes shared the cores with a test run);
after 7, 14, 21 and 28 epochs 63.43, 71.77, 78.29 and 80.05 %. Seed 1 (``--config.seed=1``):
**80.50 %** (top-5 98.72 %) in 54m41s; after 7, 14, 21 and 28 epochs 66.40, 73.52, 77.95 and 80.47 %.
After the backward-pass changes of 2026-12-04 (layout choice of the products, softmax and GELU
gradients: the same math, other rounding), seed 0 again: **80.11 %** (top-5 98.78 %) in 48m46s
(about 620 images/s); after 7, 14, 21 and 28 epochs 62.80, 72.22, 77.30 and 79.77 %.
That is the recipes issue's 80 % in 60 minutes, with little to spare in accuracy (seed to seed
the result moves by a few tenths): another CPU runs the same epochs at its own speed (pass
``:epochs=N`` to fit its hour).

How it got there (seed 0, one run each): a 7x7 root + max-pool, two units per stage and 1x1
patches reached 58.75 % in 12 epochs (47 min, AMD EPYC, AVX2 only); a 3x3 root with one unit per
stage 71.17 % in 17 epochs (54 min, AMD EPYC with AVX512-BF16, 32 GroupNorm groups, lr 2e-3).
GroupNorm groups (``resnet.num_groups``): with BiT's 32 the half-width stem's 32-channel root and
first-stage convolutions normalise each channel alone; 3-epoch probes (``:epochs=3``, Intel Xeon)
gave 45.69 % with 32 groups and 49.59 % with 8, and with 8 groups peak learning rates 5e-4,
1e-3 and 2e-3 gave 50.17, 52.15 and 49.59 % (4e-3 and batch 64 were clearly worse). What bought
the epochs: mixed-precision convolutions on CPU run as patch matrix multiplies
(``precision.conv_as_matmul``), 1.6x the training step's speed, so 35 epochs fit where 20 did.
"""

import os

from mixer_vit import config_utils


def get_config(arg=None):
  """``arg``: ``epochs=N`` (default 35, the measured recipe)."""
  arg = config_utils.parse_arg(arg, epochs=35)
  c = config_utils.base_config()
  c.dataset = os.path.expanduser('~/data/cifar10')
  c.train_split = 'train'
  c.test_split = 'test'
  c.pp_train = 'decode|pad(4)|random_crop(32)|flip_lr|value_range(-1,1)|onehot(smoothing=0.1)'
  c.pp_test = 'decode|value_range(-1,1)|onehot'
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.shuffle_buffer = 50_000

  c.matmul_dtype = 'bfloat16'

  c.model_name = 'testing'
  # 3x3 root + max-pool: stages at 16x16 and 8x8, then 2x2 patches -> 4x4 tokens.
  c.model.resnet = {
    'num_layers': (1, 1),
    'width_factor': 0.5,
    'root': 'conv3_pool',
    'num_groups': 8,
  }
  c.model.patches = {'size': (2, 2)}
  c.model.hidden_size = 192
  c.model.transformer = {'num_layers': 4, 'mlp_dim': 768, 'num_heads': 3}
  c.model.classifier = 'gap'

  c.optimizer = 'adamw'
  c.lr = 1e-3
  c.weight_decay = 5e-5
  c.schedule = 'cosine'
  c.total_steps = 50_000 * arg.epochs // c.batch_size
  c.warmup_steps = c.total_steps // 20
  c.grad_clip_norm = 1.0

  c.log_every = 100
  c.eval_every = c.total_steps // 5
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  return c
