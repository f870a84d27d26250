r"""Pretraining from scratch: ``configs/pretrain.py:MODEL,DATASET``.

  python -m mixer_vit.main --config=configs/pretrain.py:ViT-B_16,imagenet2012 \
      --workdir=workdirs/vit_b16_i1k
  python -m mixer_vit.main --config=configs/pretrain.py:Mixer-B_16,imagenet2012 \
      --workdir=workdirs/mixer_b16_i1k
  python -m mixer_vit.main --config=configs/pretrain.py:ViT-Ti_16,cifar10 \
      --workdir=workdirs/vit_ti_cifar10
  python -m mixer_vit.main --config=configs/pretrain.py:ViT-Ti_16,mnist \
      --config.data_dir=DATA_DIR --workdir=workdirs/vit_ti_mnist

MODEL is any registry name (``mixer_vit.models.list_models()``); DATASET a tfds name or an image
folder. ``precision`` (``auto`` by default, or ``float32``, ``bfloat16``, ``mixed``) sets
``dtype`` / ``matmul_dtype``: ``auto`` is ``dtype=bfloat16`` on a GPU or TPU (the fastest there),
and on a CPU mixed precision (``matmul_dtype=bfloat16``) for ImageNet, float32 for the small
data sets (``mixer_vit.models.precision.resolve_precision``). All recipes: Adam (b1 0.9, b2
0.999) with decoupled weight decay on the kernels, linear warmup then cosine (ViT) or linear
(Mixer) decay, global-norm clipping at 1.0, 224px inception crop + horizontal flip for training,
resize 256 + central crop 224 for testing.

ImageNet-1k (``imagenet2012``; 1% of train held out as in the original code, ``validation`` for
testing). Not run with this project (it needs an accelerator pod); the figures are the published
ones:
- ViT: the ViT paper's ImageNet-only recipe (Dosovitskiy et al., ICLR 2021, App. B.1 / Table 3):
  batch 4096, 300 epochs (92,898 steps), lr 3e-3, 10k warmup steps, cosine decay, weight decay
  0.3, dropout 0.1, clipping at 1, a pre-logits layer (hidden size) during pretraining. The paper's
  weight decay was flax.optim's, multiplied by the learning rate (lr * 0.3 = 9e-4 per step at the
  peak), which is ``weight_decay=9e-4`` in this project's decoupled form. The paper reports ViT-B/16
  trained on ImageNet alone at 77.9% top-1 (Table 5, after fine-tuning at 384px).
- Mixer: big_vision's ``configs/mlp_mixer_i1k.py`` (Mixer-B/16, 300 epochs, batch 4096): lr 1e-3,
  decoupled weight decay 1e-4, 10k warmup steps, linear decay to 1e-5, sigmoid cross-entropy with
  the head bias at -6.9, stochastic depth 0.1, clipping at 1, RandAugment(2, 15) and mixup with
  a Beta(0.5, 0.5) weight on every batch (big_vision's ``mixup.p=0.5`` is that concentration:
  here ``mixup={'p': 1.0, 'alpha': 0.5}``); big_vision reports 76.3% top-1.

Small data sets (anything else, e.g. ``mnist``, ``cifar10``, ``cifar100``, an image folder): 32x32
inputs with the patch size overridden to 4 (64 tokens) so that the models fit the resolution,
batch 256, lr 1e-3, decoupled weight decay 1e-4, label smoothing 0.1, 500 warmup steps, 30 epochs
(MNIST-sized) or 200 epochs (CIFAR-sized), dropout 0.1 (ViT). These recipes are plain defaults
to start from, not tuned and not run to the end: on a 2-core CPU development machine
``ViT-Ti_16,cifar10`` (the CIFAR-10 image folder, 20 steps) trained at 42 images/s, so its 200
epochs would take about 2.7 days; use an accelerator.
"""

import math

from mixer_vit import models
from mixer_vit.models import precision
from mixer_vit.training import config_utils

# Examples per split, for epochs -> steps.
_TRAIN_EXAMPLES = {
  'imagenet2012': 1_281_167,
  'mnist': 60_000,
  'fashion_mnist': 60_000,
  'cifar10': 50_000,
  'cifar100': 50_000,
}
_GREY = ('mnist', 'fashion_mnist', 'digits')


def _steps(examples: float, epochs: int, batch_size: int) -> int:
  return int(math.ceil(examples * epochs / batch_size))


def set_precision(c, name: str, cpu_half: bool) -> None:
  """``c.dtype`` and ``c.matmul_dtype`` for the ``precision`` argument
  (``precision.resolve_precision``: 'auto' is bfloat16 on a GPU or TPU; on a CPU mixed where
  ``cpu_half``, else float32)."""
  c.dtype, c.matmul_dtype = precision.resolve_precision(name, cpu_half)


def get_config(arg=None):
  """``arg``: ``MODEL,DATASET[,precision=auto]`` (default ``ViT-B_16,imagenet2012``)."""
  arg = config_utils.parse_arg(
    arg,
    positional=('model', 'dataset'),
    model='ViT-B_16',
    dataset='imagenet2012',
    precision='auto',
  )
  model_config = models.get_model_config(arg.model)  # Also checks the name.
  c = config_utils.base_config()
  c.model_name = arg.model
  c.dataset = arg.dataset
  c.optimizer = 'adamw'
  c.momentum = 0.9
  c.b2 = 0.999
  c.grad_clip_norm = 1.0
  c.log_every = 50
  c.keep_checkpoints = 3

  if arg.dataset == 'imagenet2012':
    c.train_split = 'train[:99%]'
    c.test_split = 'validation'
    c.pp_train = 'decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1,1)|onehot'
    c.pp_test = 'decode|resize_small(256)|central_crop(224)|value_range(-1,1)|onehot'
    c.batch_size = 4096
    c.eval_batch_size = 4096
    c.shuffle_buffer = 250_000
    c.total_steps = _steps(_TRAIN_EXAMPLES['imagenet2012'] * 0.99, 300, c.batch_size)
    c.warmup_steps = 10_000
    set_precision(c, arg.precision, cpu_half=True)
    c.mu_dtype = 'bfloat16'
    c.eval_every = 2_500
    c.checkpoint_every = 1_000
    if model_config.family == 'mixer':
      c.lr = 1e-3
      c.weight_decay = 1e-4
      c.schedule = 'linear'
      c.lr_end = 1e-5
      c.loss = 'sigmoid_xent'
      c.model.head_bias_init = -6.9
      c.model.stochastic_depth = 0.1
      c.pp_train = (
        'decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1,1)|onehot'
      )
      c.mixup = {'p': 1.0, 'alpha': 0.5}
    else:
      c.lr = 3e-3
      c.weight_decay = 3e-3 * 0.3
      c.schedule = 'cosine'
      c.loss = 'softmax_xent'
      c.model.dropout_rate = 0.1
      c.model.representation_size = model_config.hidden_size
    return c

  grey = arg.dataset in _GREY
  flip = '' if grey else '|flip_lr'
  c.train_split = 'train'
  c.test_split = 'test'
  c.pp_train = (
    'decode|resize(36)|random_crop(32)' + flip + '|value_range(-1,1)|onehot(smoothing=0.1)'
  )
  c.pp_test = 'decode|resize(36)|central_crop(32)|value_range(-1,1)|onehot'
  c.batch_size = 256
  c.eval_batch_size = 512
  c.shuffle_buffer = 50_000
  examples = _TRAIN_EXAMPLES.get(arg.dataset, 50_000)
  c.total_steps = _steps(examples, 30 if grey else 200, c.batch_size)
  c.warmup_steps = 500
  c.lr = 1e-3
  c.weight_decay = 1e-4
  c.schedule = 'cosine'
  c.loss = 'softmax_xent'
  c.eval_every = 1_000
  c.checkpoint_every = 1_000
  set_precision(c, arg.precision, cpu_half=False)
  if not model_config.get('resnet'):  # Hybrids keep their ResNet stem's patching.
    c.model.patches = {'size': (4, 4)}
  if model_config.family == 'vit':
    c.model.dropout_rate = 0.1
  return c
