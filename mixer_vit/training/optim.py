"""Learning-rate schedules and optimisers (optax) built from a training config.

The optimiser is a chain: global-norm clipping -> SGD momentum or Adam moments -> peak learning
rate -> per-parameter learning-rate multipliers -> decoupled weight decay on kernels -> schedule
factor -> descent. Weight decay sits after the learning rate and its multipliers, so it follows
the schedule's shape but not the learning rate's size ("decoupled" as in Loshchilov & Hutter, and
as big_vision's ``wd``).

Fine-tuning controls (all off by default, and then the chain is exactly the one above without the
multiplier step). Patterns are regular expressions matched in full (``re.fullmatch``) against the
``/``-joined parameter path, the names of the released checkpoints (``head/kernel``,
``Transformer/encoderblock_3/MlpBlock_3/Dense_0/bias``, ``conv_root/kernel``):

- ``config.frozen``: parameters matching it get no update and no weight decay, their gradients do
  not count towards the clipping norm, and the optimiser keeps no state for them
  (``optax.multi_transform`` with ``optax.set_to_zero``). ``config.trainable``: when set, every
  parameter NOT matching it is frozen too.
- ``config.lr_mults``: ``((pattern, multiplier), ...)``; a parameter takes the multiplier of the
  first pattern it matches (1 when none).
- ``config.layer_decay``: layer-wise learning-rate decay for ViT (``Transformer/encoderblock_<i>``)
  and Mixer (``MixerBlock_<i>``) with L blocks: block i (0-based) gets ``decay ** (L - i)``, the
  embedding / stem (``embedding``, ``cls``, ``Transformer/posembed_input``, the R+ViT ResNet stem,
  Mixer's ``stem``) ``decay ** (L + 1)``, the head and final norm (``head``, ``pre_logits``,
  ``MAPHead_0``, ``Transformer/encoder_norm``, ``pre_head_layer_norm``) 1 (BEiT's convention).
  Scan-stacked blocks (``encoderblock`` / ``MixerBlock`` with a leading layer axis) get the vector
  of their layers' factors, broadcast over that axis. Multiplies with ``lr_mults``.

Multipliers scale the learning rate only: weight decay (decoupled) is not scaled by them. They are
computed from the parameter tree optax hands to ``init`` / ``update``, so ``make_optimizer`` needs
nothing but the config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

SCHEDULES = ('cosine', 'linear', 'constant')
OPTIMIZERS = ('sgd', 'adamw')

# Layer-wise decay: where each parameter sits in the depth of a ViT / Mixer (full-match patterns).
_BLOCK = re.compile(r'(?:Transformer/encoderblock|MixerBlock)_(\d+)/.+')
_STACKED_BLOCK = re.compile(r'(?:Transformer/encoderblock|MixerBlock)/.+')
_EMBEDDING = re.compile(
  r'(?:embedding|cls|stem|Transformer/posembed_input|conv_root|gn_root|block\d+)(?:/.+)?'
)
_HEAD = re.compile(
  r'(?:head|pre_logits|MAPHead_0|Transformer/encoder_norm|pre_head_layer_norm)(?:/.+)?'
)
_TRAIN, _FROZEN = 'train', 'frozen'


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to ``config.lr`` over ``warmup_steps``, then ``config.schedule``."""
  lr, warmup, total = config.lr, config.warmup_steps, config.total_steps
  end = config.get('lr_end', 0.0) or 0.0
  if warmup >= total and total > 0:
    raise ValueError(
      f'warmup_steps ({warmup}) must be smaller than total_steps ({total}); '
      f'lower it, e.g. --config.warmup_steps={total // 10}.'
    )
  decay_steps = max(total - warmup, 1)
  if config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif config.schedule == 'linear':
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif config.schedule == 'constant':
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f'unknown config.schedule {config.schedule!r}; use one of {SCHEDULES}.')
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for the weight matrices/filters (leaves named ``kernel``), False for biases, norms,
  embeddings and tokens, which weight decay leaves alone."""

  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, 'key', getattr(last, 'name', None)) == 'kernel'

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def param_name(path: Iterable[Any]) -> str:
  """The ``/``-joined name of a tree path, e.g. ``Transformer/encoderblock_0/LayerNorm_0/scale``."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def param_names(params: Any) -> list[str]:
  """The names of every leaf of ``params``, in tree order."""
  return [param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _examples(names: list[str], k: int = 6) -> str:
  picked = names if len(names) <= k else [*names[: k - 1], '...', names[-1]]
  return ', '.join(picked)


def _compile(pattern: str, key: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f'config.{key}: {pattern!r} is not a regular expression ({e}).') from None


def _check_matches(pattern: re.Pattern, names: list[str], key: str) -> None:
  if not any(pattern.fullmatch(n) for n in names):
    raise ValueError(
      f'config.{key}: pattern {pattern.pattern!r} matches no parameter (it must match the whole '
      f"'/'-joined name); the parameters are named like: {_examples(names)}."
    )


def _lr_mult_pairs(config: ml_collections.ConfigDict) -> list[tuple[re.Pattern, float]]:
  pairs = config.get('lr_mults') or ()
  if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
    raise ValueError(
      f"config.lr_mults must be pairs (pattern, multiplier), e.g. (('head/.*', 10.0),); "
      f'got {pairs!r}.'
    )
  result = []
  for pair in pairs:
    if isinstance(pair, (str, bytes)) or len(pair) != 2:
      raise ValueError(
        f"config.lr_mults: {pair!r} is not a pair (pattern, multiplier), e.g. ('head/.*', 10.0)."
      )
    pattern, mult = pair
    if not isinstance(mult, (int, float)) or not mult > 0:
      raise ValueError(
        f'config.lr_mults: the multiplier of {pattern!r} must be a number > 0, got {mult!r}; '
        'to stop parameters from training, use config.frozen.'
      )
    result.append((_compile(pattern, 'lr_mults'), float(mult)))
  return result


def _layer_decay(config: ml_collections.ConfigDict) -> float:
  decay = config.get('layer_decay')
  decay = 1.0 if decay is None else float(decay)
  if not 0.0 < decay <= 1.0:
    raise ValueError(
      f'config.layer_decay must be in (0, 1] (1: off), got {decay}; e.g. 0.75 for ViT-B.'
    )
  return decay


def _num_layers(params: Any, names: list[str]) -> int:
  indices = {int(m.group(1)) for n in names if (m := _BLOCK.fullmatch(n))}
  stacked = [
    leaf.shape[0]
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    if _STACKED_BLOCK.fullmatch(param_name(path))
  ]
  if indices and stacked:
    raise ValueError('config.layer_decay: the parameters hold both per-layer and stacked blocks.')
  if stacked:
    if len(set(stacked)) != 1:
      raise ValueError(f'config.layer_decay: stacked blocks of different depths {set(stacked)}.')
    return stacked[0]
  if not indices:
    raise ValueError(
      'config.layer_decay needs ViT (Transformer/encoderblock_<i>) or Mixer (MixerBlock_<i>) '
      f'blocks; found none among the parameters: {_examples(names)}. Set it to 1 (off), or use '
      'config.lr_mults for other models.'
    )
  return max(indices) + 1


def layer_decay_factor(name: str, decay: float, num_layers: int) -> float | np.ndarray:
  """The learning-rate factor of parameter ``name`` under layer-wise decay (module docstring);
  a vector over the layer axis for scan-stacked blocks."""
  if m := _BLOCK.fullmatch(name):
    return decay ** (num_layers - int(m.group(1)))
  if _STACKED_BLOCK.fullmatch(name):
    return decay ** (num_layers - np.arange(num_layers, dtype=np.float64))
  if _EMBEDDING.fullmatch(name):
    return decay ** (num_layers + 1)
  if _HEAD.fullmatch(name):
    return 1.0
  raise ValueError(
    f'config.layer_decay: cannot place parameter {name!r} in the depth of the model: it is '
    'neither a block (Transformer/encoderblock_<i>, MixerBlock_<i>), nor the embedding / stem '
    '(embedding, cls, stem, Transformer/posembed_input, conv_root, gn_root, block<i>), nor the '
    'head (head, pre_logits, MAPHead_0, Transformer/encoder_norm, pre_head_layer_norm). Set '
    'config.layer_decay=1 and use config.lr_mults instead.'
  )


def lr_multipliers(config: ml_collections.ConfigDict, params: Any) -> dict[str, Any]:
  """``{name: factor}`` for the parameters whose learning rate ``config.lr_mults`` and
  ``config.layer_decay`` change (factors are floats, or per-layer vectors for stacked blocks)."""
  names = param_names(params)
  pairs = _lr_mult_pairs(config)
  for pattern, _ in pairs:
    _check_matches(pattern, names, 'lr_mults')
  decay = _layer_decay(config)
  num_layers = _num_layers(params, names) if decay != 1.0 else 0
  result = {}
  for name in names:
    factor = next((mult for pattern, mult in pairs if pattern.fullmatch(name)), 1.0)
    if decay != 1.0:
      factor = factor * layer_decay_factor(name, decay, num_layers)
    if np.ndim(factor) or factor != 1.0:
      result[name] = factor
  return result


def frozen_mask(config: ml_collections.ConfigDict, params: Any) -> Any:
  """True for the parameters ``config.frozen`` / ``config.trainable`` freeze."""
  names = param_names(params)
  frozen = trainable = None
  if config.get('frozen'):
    frozen = _compile(config.frozen, 'frozen')
    _check_matches(frozen, names, 'frozen')
  if config.get('trainable'):
    trainable = _compile(config.trainable, 'trainable')
    _check_matches(trainable, names, 'trainable')

  def is_frozen(name: str) -> bool:
    return bool(
      (frozen is not None and frozen.fullmatch(name))
      or (trainable is not None and not trainable.fullmatch(name))
    )

  if all(is_frozen(n) for n in names):
    raise ValueError(
      f'config.frozen={config.get("frozen")!r} / config.trainable={config.get("trainable")!r} '
      f'freeze every parameter, so nothing would train; parameters: {_examples(names)}.'
    )
  return jax.tree_util.tree_map_with_path(lambda p, _: is_frozen(param_name(p)), params)


def scale_by_multipliers(multipliers: dict[str, Any]) -> optax.GradientTransformation:
  """Multiplies the update of each parameter named in ``multipliers`` by its factor; a vector
  factor scales the leading (layer) axis. Stateless."""

  def scale(path, u):
    factor = multipliers.get(param_name(path))
    if factor is None:
      return u
    factor = np.asarray(factor)
    factor = factor.reshape(factor.shape + (1,) * (u.ndim - factor.ndim))
    return u * jnp.asarray(factor, u.dtype)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _dtype(name: str | None):
  return None if name in (None, '', 'None') else jnp.dtype(name)


def _lazy(build: Callable[[Any], optax.GradientTransformation]) -> optax.GradientTransformation:
  """A transformation built from the tree that ``init`` / ``update`` receive (its names and
  shapes only), so the optimiser needs no parameters when it is made."""

  def init(params):
    return build(params).init(params)

  def update(updates, state, params=None):
    return build(updates).update(updates, state, params)

  return optax.GradientTransformation(init, update)


def _check_finetune_config(config: ml_collections.ConfigDict) -> None:
  """Fails early (before any tree exists) on malformed fine-tuning settings."""
  _lr_mult_pairs(config)
  _layer_decay(config)
  for key in ('frozen', 'trainable'):
    if config.get(key):
      _compile(config[key], key)


def make_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
  """The optax optimiser for ``config`` (see the module docstring for its order)."""
  schedule = schedule or make_schedule(config)
  mu_dtype = _dtype(config.get('mu_dtype'))
  _check_finetune_config(config)
  use_mults = bool(config.get('lr_mults')) or _layer_decay(config) != 1.0
  use_frozen = bool(config.get('frozen') or config.get('trainable'))

  def chain(multipliers: dict[str, Any] | None) -> optax.GradientTransformation:
    parts = []
    if config.get('grad_clip_norm'):
      parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == 'sgd':
      if config.momentum:
        parts.append(optax.trace(decay=config.momentum, accumulator_dtype=mu_dtype))
    elif config.optimizer == 'adamw':
      parts.append(optax.scale_by_adam(b1=config.momentum, b2=config.b2, mu_dtype=mu_dtype))
    else:
      raise ValueError(f'unknown config.optimizer {config.optimizer!r}; use one of {OPTIMIZERS}.')
    parts.append(optax.scale(config.lr))
    if multipliers is not None:
      parts.append(scale_by_multipliers(multipliers))
    if config.get('weight_decay'):
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    if config.lr:
      parts.append(optax.scale_by_schedule(lambda count: schedule(count) / config.lr))
    parts.append(optax.scale(-1.0))
    return optax.chain(*parts)

  plain = chain(None)  # Today's optimiser, state and all (and checks config.optimizer now).
  if not (use_mults or use_frozen):
    return plain

  def build(params: Any) -> optax.GradientTransformation:
    tx = chain(lr_multipliers(config, params) if use_mults else None)
    if not use_frozen:
      return tx
    labels = jax.tree.map(lambda f: _FROZEN if f else _TRAIN, frozen_mask(config, params))
    return optax.multi_transform({_TRAIN: tx, _FROZEN: optax.set_to_zero()}, labels)

  return _lazy(build)
