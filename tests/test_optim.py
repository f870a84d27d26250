"""The optimiser's fine-tuning controls: frozen parameters, learning-rate multipliers, layer decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixer_vit import models
from mixer_vit.runtime import parallel
from mixer_vit.training import config_utils
from mixer_vit.training import optim
from mixer_vit.training import steps

from param_trees import random_params
from param_trees import tiny_vit_training


def _tree(seed=0):
  """A small tree with checkpoint-like names: kernels (decayed) and biases (not)."""
  rng = np.random.default_rng(seed)
  shapes = {
    'embedding': {'kernel': (2, 2, 3, 4), 'bias': (4,)},
    'Transformer': {'encoderblock_0': {'Dense_0': {'kernel': (4, 4), 'bias': (4,)}}},
    'head': {'kernel': (4, 3), 'bias': (3,)},
  }
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
    shapes,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def _config(**overrides):
  c = config_utils.base_config()
  c.update(dict(lr=0.1, warmup_steps=2, total_steps=10, weight_decay=0.1))
  c.update(overrides)
  return c


def _run(tx, params, num_steps=3):
  """Per-step updates of ``tx`` for fixed random gradients; returns (updates, params, state)."""
  state = tx.init(params)
  all_updates = []
  for i in range(num_steps):
    grads = _tree(seed=100 + i)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    all_updates.append(updates)
  return all_updates, params, state


def _assert_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
  'overrides', [{}, {'optimizer': 'sgd', 'mu_dtype': 'bfloat16', 'schedule': 'linear'}]
)
def test_default_settings_give_the_plain_chain_bit_for_bit(overrides):
  config = _config(**overrides)
  schedule = optim.make_schedule(config)
  if config.optimizer == 'sgd':
    moments = optax.trace(decay=config.momentum, accumulator_dtype=jnp.bfloat16)
  else:
    moments = optax.scale_by_adam(b1=config.momentum, b2=config.b2)
  reference = optax.chain(  # The optimiser before the fine-tuning controls existed.
    optax.clip_by_global_norm(config.grad_clip_norm),
    moments,
    optax.scale(config.lr),
    optax.add_decayed_weights(config.weight_decay, mask=optim.decay_mask),
    optax.scale_by_schedule(lambda count: schedule(count) / config.lr),
    optax.scale(-1.0),
  )
  got, _, state = _run(optim.make_optimizer(config, schedule), _tree())
  want, _, want_state = _run(reference, _tree())
  _assert_equal(got, want)
  assert jax.tree.structure(state) == jax.tree.structure(want_state)  # Checkpoints still restore.


def test_frozen_parameters_do_not_move_and_cost_no_state():
  params = _tree()
  config = _config(frozen='(embedding|Transformer)/.*')
  _, trained, state = _run(optim.make_optimizer(config), params)
  _assert_equal(trained['embedding'], params['embedding'])
  _assert_equal(trained['Transformer'], params['Transformer'])
  assert not np.allclose(trained['head']['kernel'], params['head']['kernel'])
  assert not np.allclose(trained['head']['bias'], params['head']['bias'])
  # Adam keeps two moments for the head's 15 numbers only.
  assert sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x)) == 2 * 15
  # `trainable` is the complement; and the head trains as if it were the whole model (its
  # clipping norm ignores the frozen gradients).
  _, same, _ = _run(optim.make_optimizer(_config(trainable='head/.*')), params)
  _assert_equal(same, trained)
  head_only = optim.make_optimizer(_config())
  state = head_only.init({'head': params['head']})
  head = params['head']
  for i in range(3):
    updates, state = head_only.update({'head': _tree(seed=100 + i)['head']}, state, {'head': head})
    head = optax.apply_updates({'head': head}, updates)['head']
  _assert_equal(head, trained['head'])


def test_frozen_through_the_jitted_train_step():
  config = _config(frozen='(embedding|cls|Transformer/posembed_input)(/.*)?', accum_steps=1)
  config.warmup_steps = 0
  model_config, model, schedule, tx, mesh = tiny_vit_training(config)
  before = random_params(model_config)  # No compile; a non-zero head, so the blocks get gradients.
  state = parallel.replicate(steps.state_from_params(before, tx), mesh)
  step = steps.make_train_step(model, tx, schedule, config, mesh)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
    'labels': np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)],
  }
  batch = parallel.shard_batch(batch, mesh)
  key = parallel.replicate(jax.random.key(1), mesh)
  for _ in range(3):
    state, _ = step(state, batch, key)
  after = jax.device_get(state.params)
  for name in ('embedding', 'cls'):
    _assert_equal(after[name], before[name])
  _assert_equal(after['Transformer']['posembed_input'], before['Transformer']['posembed_input'])
  block = 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'.split('/')
  moved = [after, before]
  for key in block:
    moved = [t[key] for t in moved]
  assert not np.allclose(*moved)
  assert not np.allclose(after['head']['bias'], before['head']['bias'])


def test_lr_mult_of_two_doubles_the_sgd_update():
  plain = dict(optimizer='sgd', momentum=0.0, grad_clip_norm=0.0, weight_decay=0.0, warmup_steps=0)
  base, _, _ = _run(optim.make_optimizer(_config(**plain)), _tree())
  mults = (('head/.*', 2.0), ('.*', 1.0))  # First match wins: the head is 2, not 1.
  doubled, _, _ = _run(optim.make_optimizer(_config(lr_mults=mults, **plain)), _tree())
  for b, d in zip(base, doubled, strict=True):
    _assert_equal(d['head'], jax.tree.map(lambda x: 2 * x, b['head']))
    _assert_equal(d['embedding'], b['embedding'])
    _assert_equal(d['Transformer'], b['Transformer'])
    assert np.abs(b['head']['kernel']).min() > 0


@pytest.mark.parametrize('scan', [False, True], ids=['per_layer', 'scan'])
@pytest.mark.parametrize('name', ['testing', 'testing-mixer'])
def test_layer_decay_gives_the_per_block_factors(name, scan):
  model_config = models.get_model_config(name, scan=scan)
  num_layers = model_config.get('num_blocks') or model_config.transformer.num_layers
  params = random_params(model_config)
  decay = 0.5
  config = _config(
    optimizer='sgd', momentum=0.0, grad_clip_norm=0.0, weight_decay=0.0, lr=1.0,
    warmup_steps=0, schedule='constant', layer_decay=decay,
  )  # fmt: skip
  tx = optim.make_optimizer(config)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  factors = {}  # name -> the factor (per layer) the update shows
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    u = -np.asarray(u)
    stacked = optim.param_name(path).startswith(('Transformer/encoderblock/', 'MixerBlock/'))
    per_layer = u.reshape(u.shape[0] if stacked else 1, -1)
    assert (per_layer == per_layer[:, :1]).all()
    factors[optim.param_name(path)] = per_layer[:, 0]

  def factor(prefix):
    found = {tuple(v) for k, v in factors.items() if k.startswith(prefix)}
    assert len(found) == 1, (prefix, found)
    return found.pop()

  block = 'Transformer/encoderblock' if name == 'testing' else 'MixerBlock'
  stem = 'embedding' if name == 'testing' else 'stem'
  final_norm = 'Transformer/encoder_norm' if name == 'testing' else 'pre_head_layer_norm'
  blocks = [decay ** (num_layers - i) for i in range(num_layers)]
  if scan:
    assert factor(block + '/') == tuple(blocks)
  else:
    for i in range(num_layers):
      assert factor(f'{block}_{i}/') == (blocks[i],)
  assert factor(stem + '/') == (decay ** (num_layers + 1),)
  assert factor('head/') == (1.0,)
  assert factor(final_norm + '/') == (1.0,)
  if name == 'testing':
    assert factor('cls') == factor('Transformer/posembed_input/') == factor('embedding/')


def test_bad_settings_name_the_key_and_what_to_do():
  params = _tree()
  tx = optim.make_optimizer(_config(frozen='Head/.*'))
  with pytest.raises(ValueError, match=r"config\.frozen.*'Head/\.\*'.*head/kernel"):
    tx.init(params)
  tx = optim.make_optimizer(_config(trainable='.*', frozen='.*'))
  with pytest.raises(ValueError, match='freeze every parameter'):
    tx.init(params)
  with pytest.raises(ValueError, match=r'config\.lr_mults.*> 0.*config\.frozen'):
    optim.make_optimizer(_config(lr_mults=(('head/.*', 0.0),)))
  with pytest.raises(ValueError, match=r'config\.lr_mults.*not a pair'):
    optim.make_optimizer(_config(lr_mults=('head/.*', 2.0)))
  with pytest.raises(ValueError, match=r'config\.frozen.*not a regular expression'):
    optim.make_optimizer(_config(frozen='(head'))
  with pytest.raises(ValueError, match=r'config\.layer_decay must be in \(0, 1\]'):
    optim.make_optimizer(_config(layer_decay=1.5))
  tx = optim.make_optimizer(_config(layer_decay=0.5))
  with pytest.raises(ValueError, match=r'config\.layer_decay needs ViT'):
    tx.init({'a': {'kernel': jnp.ones(2)}})
  with pytest.raises(ValueError, match=r"cannot place parameter 'extra/kernel'"):
    tx.init({**params, 'extra': {'kernel': jnp.ones(2)}})
  # The R+ViT stem and the MAP head have their places.
  assert optim.layer_decay_factor('block2/unit1/conv1/kernel', 0.5, 3) == 0.5**4
  assert optim.layer_decay_factor('MAPHead_0/probe', 0.5, 3) == 1.0
