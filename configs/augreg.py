r"""AugReg pretraining ("How to train your ViT?", Steiner et al. 2021): ``augreg.py:MODEL,AUG,DATASET``.

  python -m mixer_vit.main --config=configs/augreg.py:ViT-B_16,medium2,imagenet2012 \
      --workdir=workdirs/augreg_b16_i1k
  python -m mixer_vit.main --config=configs/augreg.py:ViT-B_16,medium1,imagenet21k,epochs=30 \
      --workdir=workdirs/augreg_b16_i21k_30ep
  python -m mixer_vit.main --config=configs/augreg.py:ViT-S_16,light1,imagenet2012,wd=0.03,do=0.1,sd=0.1 \
      --workdir=workdirs/augreg_s16_i1k_light1

MODEL: a ViT or R+ViT of the registry (AugReg trained no Mixer). AUG: the paper's augmentation
level, RandAugment (layers, magnitude) on the uint8 image before ``value_range`` and mixup on the
batch (``config.mixup = {'p': 1.0, 'alpha': A}``: every batch mixed with a Beta(A, A) weight;
big_vision calls A ``mixup.p``), as in big_vision's ``configs/vit_i1k.py`` / ``vit_i21k.py``,
the paper's code:

  level     RandAugment   mixup alpha
  none      -             -
  light1    randaug(2,0)  -      (magnitude 0 still changes images: not "nothing")
  light2    randaug(2,10) 0.2
  medium1   randaug(2,15) 0.2
  medium2   randaug(2,15) 0.5
  strong1   randaug(2,20) 0.5
  strong2   randaug(2,20) 0.8

Regularisation, the paper's grid, as the released files name it (``wd_0.1-do_0.0-sd_0.0``):
``wd`` 0.1 or 0.03 (default 0.1), ``do`` dropout 0.0 or 0.1 (default 0.0), ``sd`` stochastic depth
0.0 or 0.1 (default 0.0). ``wd`` is in the paper's convention, a multiple of the learning rate:
``weight_decay = wd * lr`` in this project's decoupled form (0.1 -> 1e-4, which is big_vision's
``wd=0.0001`` of those configs; the reading of the file names' ``wd_X`` as ``X * lr`` is inferred
from them, not stated in the release). big_vision's configs pick per model, "a good average
between 30ep and 300ep": ImageNet-1k Ti/16 light1, S/32 light2, S/16 B/32 B/16 L/16 medium2;
ImageNet-21k Ti/16 S/32 none, S/16 light1, B/32 B/16 light2, L/16 medium2.

Both data sets: Adam (b1 0.9, b2 0.999, first moment in bfloat16), batch 4096, learning rate 1e-3
with 10k linear warmup steps then cosine decay to 0, global-norm clipping at 1.0, bfloat16
compute (``precision=auto``, as in ``configs/pretrain.py``: ``dtype=bfloat16`` on a GPU or TPU,
mixed precision on a CPU; or ``float32``, ``bfloat16``, ``mixed``),
``decode_jpeg_and_inception_crop(224)|flip_lr`` then the level's ops for training, resize 256 +
central crop 224 for evaluation (the ImageNet set-up of ``configs/pretrain.py``).
- ``imagenet2012`` (DATASET default): 300 epochs (``epochs=N`` changes it) of ``train[:99%]``,
  tested on ``validation``; softmax cross-entropy, a ``pre_logits`` layer (big_vision's
  ``rep_size=True``).
- ``imagenet21k``: 30 or 300 epochs (default 300) of ``full[51200:]``, tested on
  ``full[:25600]`` (big_vision's held-out part); sigmoid cross-entropy with the head bias at -10,
  no ``pre_logits`` (the released i21k files have none). Steps are counted from 14,197,122 images
  (the fall 2011 release with 21,843 classes); set ``total_steps`` for another copy. The tfds
  set named ``imagenet21k`` must be prepared in ``data_dir``.

Expected, not measured: these recipes have not been run with this project (they need an
accelerator pod; ImageNet-21k for 300 epochs is about a million steps of 4096 images). The paper reports that with
AugReg and enough compute ViTs trained on the public ImageNet-21k match or beat the same models
trained on the 10x larger, non-public JFT-300M. The accuracy of every released run of this grid,
upstream (``final_val``) and after fine-tuning (``adapt_final_test``), is in the release's
``index.csv``: ``python -m mixer_vit.pick_augreg --index=index.csv --model=B/16`` lists them.
"""

import math
import pathlib

from mixer_vit import models
from mixer_vit.training import config_utils

# (RandAugment (num_layers, magnitude) or None, mixup alpha or 0) per level.
AUG_LEVELS = {
  'none': (None, 0.0),
  'light1': ((2, 0), 0.0),
  'light2': ((2, 10), 0.2),
  'medium1': ((2, 15), 0.2),
  'medium2': ((2, 15), 0.5),
  'strong1': ((2, 20), 0.5),
  'strong2': ((2, 20), 0.8),
}
DATASETS = ('imagenet2012', 'imagenet21k')
I21K_IMAGES = 14_197_122
I21K_HELD_OUT = 51_200

_pretrain = config_utils.load_config_module(pathlib.Path(__file__).with_name('pretrain.py'))


def get_config(arg=None):
  """``arg``: ``MODEL,AUG,DATASET[,wd=0.1,do=0.0,sd=0.0,epochs=300,precision=auto]``."""
  arg = config_utils.parse_arg(
    arg,
    positional=('model', 'aug', 'dataset'),
    model='ViT-B_16',
    aug='medium2',
    dataset='imagenet2012',
    wd=0.1,
    do=0.0,
    sd=0.0,
    epochs=300,
    precision='auto',
  )
  if models.get_model_config(arg.model).family != 'vit':
    raise ValueError(
      f'configs/augreg.py: {arg.model} is no ViT; AugReg trained ViT and R+ViT models (use '
      'configs/pretrain.py for Mixer).'
    )
  if arg.aug not in AUG_LEVELS:
    raise ValueError(f'configs/augreg.py: unknown AUG {arg.aug!r}; use one of {list(AUG_LEVELS)}.')
  if arg.dataset not in DATASETS:
    raise ValueError(f'configs/augreg.py: DATASET {arg.dataset!r}; use one of {DATASETS}.')
  # The ImageNet set-up (splits, evaluation, batch 4096, 10k warmup, bfloat16, clipping at 1).
  c = _pretrain.get_config(f'{arg.model},imagenet2012,precision={arg.precision}')
  c.lr = 1e-3
  c.schedule = 'cosine'
  c.lr_end = 0.0
  c.weight_decay = arg.wd * c.lr
  c.model.dropout_rate = arg.do
  c.model.stochastic_depth = arg.sd
  randaug, alpha = AUG_LEVELS[arg.aug]
  ops = f'randaug({randaug[0]},{randaug[1]})|' if randaug else ''
  c.pp_train = f'decode_jpeg_and_inception_crop(224)|flip_lr|{ops}value_range(-1,1)|onehot'
  if alpha:
    c.mixup = {'p': 1.0, 'alpha': alpha}
  examples = _pretrain._TRAIN_EXAMPLES['imagenet2012'] * 0.99
  if arg.dataset == 'imagenet21k':
    c.dataset = 'imagenet21k'
    c.train_split = f'full[{I21K_HELD_OUT}:]'
    c.test_split = 'full[:25600]'
    c.loss = 'sigmoid_xent'
    c.model.head_bias_init = -10.0
    del c.model['representation_size']
    c.eval_every = 10_000
    examples = I21K_IMAGES - I21K_HELD_OUT
  c.total_steps = int(math.ceil(examples * arg.epochs / c.batch_size))
  return c
