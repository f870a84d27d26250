r"""MNIST on a CPU with a Dynamic ViT cascade (``DVT-XS_4``): three ViT stages on the digit resized
to 12, 20 and 28 pixels (3x3, 5x5 and 7x7 tokens of 4x4 pixels), feature and relationship reuse.

  python -m mixer_vit.data.mnist_idx --idx_dir=DIR_WITH_IDX_FILES --data_dir=~/data/tfds
  python -m mixer_vit.main --config=configs/mnist_dvt.py --config.data_dir=~/data/tfds \
      --workdir=workdirs/mnist_dvt
  python -m mixer_vit.evaluate --checkpoint=workdirs/mnist_dvt --budget=0.006 \
      --holdout_split='train[55000:]'

The training loss is the sum of the three stages' losses. The last 5,000 training images
(``train[55000:]``) are left out of training: ``evaluate --budget`` chooses its thresholds on them
(``--holdout_split``). ``:model=vit`` trains the last stage alone (a plain ViT of the same size on
28x28 digits), the single-model baseline; ``:epochs=N`` sets the length.

Measured with the second command above (3 epochs, 1,289 steps of 128, the default; seed 0, float32),
2-core Intel Xeon with nothing else running, 2026-12-05, one run: 5m10s of training (evaluation and
checkpoints included); test top-1 95.42 / 96.24 / 96.74 % for stages 0 / 1 / 2 answering every image
(0.0025 / 0.0104 / 0.0305 GFLOPs per image); with the third command 96.68 % at 0.0057 GFLOPs per
image (74 % of the images answered by stage 0). ``:model=vit,epochs=6`` (the last stage alone, about
the cascade's training time: 4m39s; 0.0156 GFLOPs per image): 98.19 %; ``:model=vit,epochs=3`` (the
cascade's steps, 2m19s): 95.60 %. docs/dynamic_vit.md has the table and the picture.
"""

from mixer_vit.training import config_utils


def get_config(arg=None):
  """``arg``: ``epochs=E`` (default 3.0), ``model=dvt`` (the cascade) or ``model=vit``."""
  arg = config_utils.parse_arg(arg, epochs=3.0, model='dvt')
  if arg.model not in ('dvt', 'vit'):
    raise ValueError(f"configs/mnist_dvt.py:model={arg.model}: use 'dvt' or 'vit'.")
  c = config_utils.base_config()
  c.dataset = 'mnist'
  c.train_split = 'train[:55000]'
  c.test_split = 'test'
  c.pp_train = 'decode|pad(2)|random_crop(28)|value_range(-1,1)|onehot(smoothing=0.1)'
  c.pp_test = 'decode|value_range(-1,1)|onehot'
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.shuffle_buffer = 55_000

  if arg.model == 'dvt':
    c.model_name = 'DVT-XS_4'
  else:  # The last stage of DVT-XS_4 alone.
    c.model_name = 'testing'
    c.model.patches = {'size': (4, 4)}
    c.model.hidden_size = 64
    c.model.transformer = {'num_layers': 4, 'mlp_dim': 128, 'num_heads': 4}

  c.model.classifier = 'gap'

  c.optimizer = 'adamw'
  c.lr = 1e-3
  c.weight_decay = 5e-5
  c.schedule = 'cosine'
  c.total_steps = max(1, int(55_000 * arg.epochs) // c.batch_size)
  c.warmup_steps = c.total_steps // 20
  c.grad_clip_norm = 1.0

  c.log_every = 50
  c.eval_every = c.total_steps
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  return c
