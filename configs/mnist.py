r"""MNIST from scratch on a CPU: a small ResNet + ViT hybrid, from the four official idx files.

  python -m mixer_vit.data.mnist_idx --idx_dir=DIR_WITH_IDX_FILES --data_dir=~/data/tfds
  python -m mixer_vit.main --config=configs/mnist.py --config.data_dir=~/data/tfds \
      --workdir=workdirs/mnist

The first line writes tfds's own ``mnist`` into ``~/data/tfds`` without a download (on a machine
with network access, leave ``data_dir`` out and tfds downloads it). The model is the CIFAR-10
recipe's hybrid (``configs/cifar10.py``) made smaller: a two-stage half-width BiT stem turns
28x28 digits into 4x4 tokens for a 4-layer encoder of width 128. Pad-and-crop shifts (no flips:
digits are not symmetric), label smoothing, cosine schedule.

MEASURED: see the README's results table (filled in by the runs that measured it).
"""

from mixer_vit import config_utils


def get_config(arg=None):
  """``arg``: ``epochs=N`` (default 3)."""
  arg = config_utils.parse_arg(arg, epochs=3)
  c = config_utils.base_config()
  c.dataset = 'mnist'
  c.train_split = 'train'
  c.test_split = 'test'
  c.pp_train = 'decode|pad(2)|random_crop(28)|value_range(-1,1)|onehot(smoothing=0.1)'
  c.pp_test = 'decode|value_range(-1,1)|onehot'
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.shuffle_buffer = 60_000

  c.model_name = 'testing'
  c.model.resnet = {'num_layers': (2, 2), 'width_factor': 0.5}
  c.model.patches = {'size': (1, 1)}
  c.model.hidden_size = 128
  c.model.transformer = {'num_layers': 4, 'mlp_dim': 512, 'num_heads': 4}
  c.model.classifier = 'gap'

  c.optimizer = 'adamw'
  c.lr = 2e-3
  c.weight_decay = 5e-5
  c.schedule = 'cosine'
  c.total_steps = 60_000 * arg.epochs // c.batch_size
  c.warmup_steps = c.total_steps // 20
  c.grad_clip_norm = 1.0

  c.log_every = 100
  c.eval_every = c.total_steps // 3
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  return c
