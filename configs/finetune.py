r"""Fine-tunes a pretrained checkpoint: ``configs/finetune.py:MODEL,DATASET``.

  wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz
  python -m mixer_vit.main --config=configs/finetune.py:ViT-B_16,cifar10 \
      --config.pretrained=ViT-B_16.npz --workdir=workdirs/vit_b16_cifar10

``--config.pretrained`` takes a released ``.npz`` (local or ``gs://``) or the ``params.npz`` of a
run of this project; it defaults to ``MODEL.npz`` in the current directory. The head is replaced
for the new class count and the position embeddings are resized to the new resolution
(``models.load_pretrained``).

The defaults are those of the original fine-tuning code (google-research/vision_transformer,
``vit_jax/configs/common.py``): SGD with momentum 0.9 and a bfloat16 momentum buffer, base lr
0.03, 500 warmup steps, cosine decay, gradient clipping at global norm 1, batch 512 (as 8
accumulated micro-batches of 64), no weight decay, 384x384 inputs (random crop of 5-100% of the
area + flip for training, plain resize for testing), 10,000 steps for CIFAR (train[:98%]) and
20,000 for ImageNet (train[:99%], tested on validation). With them the original repository
reports, on 8 V100s (not run with this project, which was developed on CPUs):
ViT-B_16 (ImageNet-21k) -> cifar10 98.92% / 99.03% (7.2h / 7.7h), -> cifar100 92.26% / 92.64%,
-> imagenet2012 84.62% / 84.61% (17.9h); ViT-B_32 -> cifar10 98.93% (1.6h).
Shorter schedules work too, e.g. ``--config.total_steps=500 --config.warmup_steps=50`` (98.59%
on cifar10 for ViT-B_16 in that table).

Fine-tuning controls (``mixer_vit.training.optim``; all off here, as in the original code). Patterns are
regular expressions matched in full against the checkpoint's parameter names:

  --config.trainable='head/.*'                          # a linear probe: only the head trains
  --config.frozen='(conv_root|gn_root|block\d+)/.*'     # R+ViT: freeze the ResNet stem
  --config.lr_mults="(('head/.*', 10.0),)"              # the head at 10x the learning rate
  --config.layer_decay=0.75                             # block i of L at 0.75 ** (L - i)

Frozen parameters get no update, no weight decay and no optimiser state. With ``layer_decay``
the embedding / stem trains at ``layer_decay ** (L + 1)`` and the head and final norm at 1.
"""

from mixer_vit import models
from mixer_vit.training import config_utils

_STEPS = {'imagenet2012': 20_000}  # Everything else: 10,000 (CIFAR's).
_TRAIN_SPLITS = {'cifar10': 'train[:98%]', 'cifar100': 'train[:98%]', 'imagenet2012': 'train[:99%]'}
_TEST_SPLITS = {'imagenet2012': 'validation'}


def get_config(arg=None):
  """``arg``: ``MODEL,DATASET`` (default ``ViT-B_16,cifar10``); ``resolution=N`` changes 384."""
  arg = config_utils.parse_arg(
    arg, positional=('model', 'dataset'), model='ViT-B_16', dataset='cifar10', resolution=384
  )
  models.get_model_config(arg.model)  # Checks the name early.
  c = config_utils.base_config()
  c.model_name = arg.model
  c.pretrained = f'{arg.model}.npz'
  c.dataset = arg.dataset
  c.train_split = _TRAIN_SPLITS.get(arg.dataset, 'train')
  c.test_split = _TEST_SPLITS.get(arg.dataset, 'test')
  res = arg.resolution
  c.pp_train = f'decode|inception_crop({res})|flip_lr|value_range(-1,1)|onehot'
  c.pp_test = f'decode|resize({res})|value_range(-1,1)|onehot'
  c.batch_size = 512
  c.eval_batch_size = 512
  c.accum_steps = 8  # Memory only: the update is the same as one batch of 512.
  c.shuffle_buffer = 50_000

  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.mu_dtype = 'bfloat16'
  c.lr = 0.03
  c.schedule = 'cosine'
  c.warmup_steps = 500
  c.total_steps = _STEPS.get(arg.dataset, 10_000)
  c.grad_clip_norm = 1.0
  c.weight_decay = 0.0
  c.loss = 'softmax_xent'

  c.log_every = 50
  c.eval_every = 1_000
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 2
  return c
