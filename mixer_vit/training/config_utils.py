"""Training config helpers: the shared defaults, argument parsing and JSON round trips.

Every config file in ``configs/`` starts from ``base_config()`` so all of them have the same keys
(the ones scripts and ``mixer_vit.training.train`` rely on) and ``--config.KEY=VALUE`` works for each.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import types
from typing import Any

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every key the trainer and the data pipeline read.

  The config files override what their recipe needs. Keys that may hold either ``None`` or a value
  are declared with a placeholder type so that command-line overrides parse (e.g.
  ``--config.pretrained=/path/to.npz``).
  """
  c = ml_collections.ConfigDict()

  # Data (read by mixer_vit.data).
  c.dataset = 'digits'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = 'train'
  c.test_split = 'test'
  c.pp_train = 'decode|value_range(-1,1)|onehot'
  c.pp_test = 'decode|value_range(-1,1)|onehot'
  c.batch_size = 128  # Global, over all devices of all hosts.
  c.eval_batch_size = 256  # Global.
  c.seed = 0
  c.shuffle_buffer = 10_000
  c.prefetch = 2  # Batches tf.data prepares ahead.
  c.skip_corrupt = False
  c.in_memory_max_mb = 1024  # Splits up to this size are read into memory; larger ones streamed.
  c.data_threads = 0  # tf.data threads; 0: all cores.
  c.device_prefetch = 2  # Batches placed on the devices ahead of use.
  # Encoded images with more decoded pixels (height x width) are refused before decoding, with an
  # error naming the file (image folders); 0: no limit.
  c.max_image_pixels = 8000 * 8000
  # Mixup / CutMix of training batches (mixer_vit.data.mix), off while p = 0: p = probability that
  # a batch is mixed that way (mixup.p + cutmix.p <= 1), alpha = Beta(alpha, alpha) concentration
  # (AugReg: mixup p=1, alpha 0.2 / 0.5 / 0.8; DeiT: mixup p=.5, alpha .8 + cutmix p=.5, alpha 1).
  c.mixup = ml_collections.ConfigDict({'p': 0.0, 'alpha': 0.2})
  c.cutmix = ml_collections.ConfigDict({'p': 0.0, 'alpha': 1.0})

  # Model: a registry name plus overrides for models.get_model_config (num_classes comes from
  # the data set).
  c.model_name = 'testing'
  c.model = ml_collections.ConfigDict()
  c.dtype = 'float32'  # Activation dtype; 'bfloat16' puts every activation in bfloat16.
  # Mixed precision: 'bfloat16' multiplies bfloat16 operands with float32 sums and keeps the rest
  # float32 (models/precision.py); parameters stay float32 either way.
  c.matmul_dtype = ml_collections.FieldReference(None, field_type=str)
  # A `.npz` checkpoint (local or gs://) to start from: its head is replaced and its position
  # embeddings are resized to this model (models.load_pretrained).
  c.pretrained = ml_collections.FieldReference(None, field_type=str)

  # Optimisation.
  c.total_steps = 1000
  c.optimizer = 'adamw'  # 'adamw' | 'sgd' (momentum).
  c.lr = 1e-3  # Peak learning rate.
  c.schedule = 'cosine'  # 'cosine' | 'linear' | 'constant', after a linear warmup from 0.
  c.warmup_steps = 100
  c.lr_end = 0.0  # Learning rate at the end of the decay.
  c.momentum = 0.9  # SGD momentum, or Adam's b1.
  c.b2 = 0.999  # Adam's b2.
  c.mu_dtype = ml_collections.FieldReference(None, field_type=str)  # Momentum buffer dtype.
  # Decoupled weight decay on the kernels: each step multiplies them by (1 - weight_decay * s),
  # where s is the schedule's factor in [0, 1] (the learning rate relative to its peak), i.e.
  # NOT scaled by `lr`. optax.adamw(weight_decay=w) equals weight_decay = w * lr here.
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0  # Global-norm clipping; 0 or None turns it off.
  c.accum_steps = 1  # Micro-batches per step (gradient accumulation inside the jitted step).
  c.loss = 'softmax_xent'  # 'softmax_xent' | 'sigmoid_xent'.
  # Cascades (family dvt): the weight of each stage's loss in the training loss, one per stage;
  # (): every stage's loss counts once (their sum).
  c.stage_loss_weights = ()
  # Fine-tuning controls (mixer_vit.training.optim; all off by default). Patterns are regular expressions
  # matched in full against the '/'-joined parameter names of the released checkpoints, e.g.
  # 'head/kernel', 'Transformer/encoderblock_3/MlpBlock_3/Dense_0/bias', 'conv_root/kernel'.
  # Frozen parameters get no update and no weight decay, don't count towards the clipping norm,
  # and have no optimiser state. A pattern that matches no parameter is an error. Scan-stacked
  # models name a block stack once ('Transformer/encoderblock/...', 'MixerBlock/...').
  c.frozen = ''  # Freeze the parameters matching it, e.g. '(conv_root|gn_root|block\d+)/.*'.
  c.trainable = ''  # If set, freeze every parameter NOT matching it, e.g. 'head/.*'.
  # Learning-rate multipliers: ((pattern, multiplier > 0), ...); the first matching pattern wins,
  # e.g. (('head/.*', 10.0),). They scale the learning rate, not the (decoupled) weight decay.
  c.lr_mults = ()
  # Layer-wise learning-rate decay for ViT / Mixer (1: off): with L blocks, block i gets
  # layer_decay ** (L - i), the embedding / stem layer_decay ** (L + 1), head and final norm 1.
  c.layer_decay = 1.0
  # Exponential moving average of the parameters (mixer_vit.training.steps), 0: off. Each step
  # ema <- decay * ema + (1 - decay) * params, from ema = the initial parameters (no warm-up); it
  # averages over about 1 / (1 - decay) steps. Evaluated beside the parameters (test_*_ema),
  # written to params_ema.npz; infer / evaluate --ema use it. Changing it on resume needs
  # allow_config_change (turned on, the EMA starts from the resumed parameters).
  c.ema_decay = 0.0

  # The device mesh (mixer_vit.runtime.parallel): (data, fsdp) over every device. The parameters and
  # optimiser state are sharded over `fsdp` devices (FSDP; 1: replicated, pure data parallel),
  # the batch over all. `rules`: ((regex, spec), ...) overriding the layout of the leaves whose
  # '/'-joined path ends with a match, e.g. (('.*/embedding/kernel', (None, None, None, 'fsdp')),)
  # or (('head/kernel', ()),) for replicated. May change when a run resumes.
  c.mesh = ml_collections.ConfigDict({'fsdp': 1, 'rules': ()})

  # Bookkeeping (in steps).
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  # Resuming a workdir with a config that changes what is trained (model, data, preprocessing,
  # optimisation, seed, ...) is refused; True accepts the change and records it in the workdir's
  # config_history.jsonl (mixer_vit.workdir.RESUMABLE_KEYS lists the keys that may always change).
  c.allow_config_change = False

  # Few-shot linear probes of the representation (mixer_vit.training.fewshot), logged as
  # fewshot/<name>_<k>shot every `fewshot_every` steps (0: never).
  c.fewshot_every = 0
  c.fewshot = ml_collections.ConfigDict()
  # name -> data set, or name -> {'dataset', 'train_split', 'test_split', 'pp'}; empty: the
  # training data set with its train_split / test_split (pp: pp_test).
  c.fewshot.datasets = ml_collections.ConfigDict()
  c.fewshot.shots = (1, 5, 10, 25)  # Train examples per class.
  c.fewshot.layer = 'pre_logits'  # Or 'logits', 'encoded', 'blocks/<i>' (token mean).
  c.fewshot.l2_regs = tuple(2.0**k for k in range(-6, 17, 2))  # Ridge strengths tried.
  c.fewshot.select = 'loo'  # 'loo': best leave-one-out on the shots; 'test': best test accuracy.
  c.fewshot.seed = 0  # The choice of the shots.
  return c


def parse_arg(
  arg: str | None, positional: tuple[str, ...] = (), **defaults: Any
) -> ml_collections.ConfigDict:
  """Parses a config-file argument like ``ViT-B_16,cifar10`` or ``model=ViT-B_16,steps=100``.

  Args:
    arg: The text after ``:`` in ``--config=FILE.py:ARG`` (None or empty for defaults).
    positional: Names of the values that may be given without ``name=``, in order.
    **defaults: Every accepted name and its default; the default's type converts the text.

  Returns:
    A ConfigDict with one entry per name in ``defaults``.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for i, part in enumerate(p.strip() for p in arg.split(',')):
    if '=' in part:
      name, value = (s.strip() for s in part.split('=', 1))
    elif i < len(positional):
      name, value = positional[i], part
    else:
      raise ValueError(
        f'config argument {arg!r}: cannot place {part!r}; give it as name=value '
        f'with a name from {sorted(defaults)}.'
      )
    if name not in defaults:
      raise ValueError(
        f'config argument {arg!r}: unknown name {name!r}; known names: {sorted(defaults)}.'
      )
    default = defaults[name]
    if isinstance(default, bool):
      if value.lower() not in ('1', 'true', 'yes', '0', 'false', 'no'):
        raise ValueError(
          f'config argument {arg!r}: {name}={value!r} is not a bool; give {name}=true or '
          f'{name}=false.'
        )
      value = value.lower() in ('1', 'true', 'yes')
    elif default is not None:
      try:
        value = type(default)(value)
      except (TypeError, ValueError):
        raise ValueError(
          f'config argument {arg!r}: {name}={value!r} is not a valid '
          f'{type(default).__name__}; give e.g. {name}={default}.'
        ) from None
    result[name] = value
  return result


# Keys that count or size something: a value <= 0 is refused naming the key (check_positive).
_POSITIVE_KEYS = ('total_steps', 'batch_size', 'eval_batch_size', 'accum_steps')
_POSITIVE_MODEL_WORDS = ('size', 'dim', 'num_', 'heads', 'layers', 'blocks', 'width', 'depth')


def check_positive(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first count or size of ``config`` that is not positive: the
  step count, batch sizes, and the model's sizes (``config.model``: hidden sizes, dims, counts of
  layers, heads and blocks, patch sizes)."""
  for key in _POSITIVE_KEYS:
    value = config.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
      raise ValueError(f'config.{key} must be >= 1 (got {value}); e.g. --config.{key}=1 or more.')
  if config.get('warmup_steps', 0) < 0:
    raise ValueError(f'config.warmup_steps must be >= 0 (got {config.warmup_steps}).')

  def visit(tree: Any, prefix: str) -> None:
    for key, value in tree.items():
      name = f'{prefix}.{key}'
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        visit(value, name)
        continue
      if not any(word in name.rsplit('.', 1)[-1] for word in _POSITIVE_MODEL_WORDS):
        continue
      numbers = value if isinstance(value, (tuple, list)) else (value,)
      bad = [v for v in numbers if isinstance(v, int) and not isinstance(v, bool) and v < 1]
      if bad:
        raise ValueError(f'config.{name} must be positive (got {value!r}).')

  model = config.get('model')
  if isinstance(model, (dict, ml_collections.ConfigDict)):
    visit(model, 'model')


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (tuples become lists)."""
  return config.to_json_best_effort(indent=2, sort_keys=True)


def parse_value(text: str, current: Any = None) -> Any:
  """A command-line value: converted to the type of ``current`` when it has one (bool, int,
  float, str, tuple); else a Python literal (``2``, ``0.1``, ``True``, ``(16, 16)``, ``None``)
  or, when it is none, the text itself."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered not in ('true', 'false', '1', '0'):
      raise ValueError(f'{text!r} is not a bool; give True or False.')
    return lowered in ('true', '1')
  if isinstance(current, (int, float, str)) and current is not None:
    try:
      return type(current)(text)
    except ValueError:
      raise ValueError(f'{text!r} is not a valid {type(current).__name__}.') from None
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return _tuples(value) if isinstance(value, list) else value


def set_model_keys(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
  """Sets ``config.model.KEY=VALUE`` overrides from the command line, also for keys the config
  file does not set (any key of the model's registry entry; ``steps.make_model`` refuses the
  others, naming the known keys). ``KEY`` may be dotted (``transformer.num_layers``)."""
  with config.unlocked():
    for key, text in overrides:
      *parents, leaf = key.split('.')
      node = config.model
      for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
          node[part] = ml_collections.ConfigDict()
        node = node[part]
      current = node[leaf] if leaf in node else None
      try:
        value = parse_value(text, current)
      except ValueError as e:
        raise ValueError(f'--config.model.{key}={text}: {e}') from None
      if leaf in node and current is not None and not isinstance(value, type(current)):
        del node[leaf]
      node[leaf] = value


def _tuples(value: Any) -> Any:
  """JSON has no tuples; configs use them for shapes (patch sizes), lists nowhere."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of ``to_json`` for the values configs hold."""
  return ml_collections.ConfigDict(_tuples(json.loads(text)))


def load_config_module(path: str | os.PathLike) -> types.ModuleType:
  """Imports a config file (e.g. ``configs/digits.py``) as a module, as ``--config=`` does."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'config file {path} not found.')
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of ``'FILE.py[:ARG]'``, the ``--config`` syntax: ``get_config(ARG)`` of FILE."""
  path, _, arg = str(spec).partition(':')
  return load_config_module(path).get_config(arg or None)
