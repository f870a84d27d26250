"""The run set-up, written once: settings read from the config once, the state's layout, the steps.

The trainer, ``memory`` and ``benchmark`` build their model, optimiser, state and shardings with
``mixer_vit.training.run_setup``; this checks what it builds and that none of the three builds it again.
"""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import tiny_config

from mixer_vit.runtime import parallel
from mixer_vit.training import optim
from mixer_vit.training import run_setup
from mixer_vit.training import steps

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_settings_are_read_once_into_typed_objects():
  config = tiny_config(accum_steps=2, ema_decay=0.9, loss='sigmoid_xent')
  config.mesh.fsdp = 2
  config.mesh.rules = (('head/kernel', ()),)
  settings = run_setup.RunSettings.from_config(config)
  assert settings.batch_size == 32
  assert settings.step == steps.StepSettings('sigmoid_xent', 2, 0.9) and settings.step.ema
  assert settings.mesh == parallel.MeshSettings(2, (('head/kernel', ()),))
  fsdp, rules = settings.mesh  # Still the (fsdp, rules) pair of parallel.mesh_settings.
  assert (fsdp, rules) == (2, (('head/kernel', ()),))
  assert not run_setup.RunSettings.from_config(tiny_config()).step.ema


@pytest.mark.parametrize(
  'overrides, match',
  [
    ({'accum_steps': 0}, 'accum_steps must be >= 1'),
    ({'ema_decay': 1.0}, r'config.ema_decay must be in \(0, 1\)'),
    ({'loss': 'hinge'}, 'unknown config.loss'),
  ],
)
def test_bad_settings_fail_in_one_line(overrides, match):
  with pytest.raises(ValueError, match=match) as e:
    run_setup.RunSettings.from_config(tiny_config(**overrides))
  assert '\n' not in str(e.value)


def test_the_one_batch_check_names_the_flag_and_a_size_that_works():
  settings = run_setup.RunSettings.from_config(tiny_config(batch_size=24, accum_steps=2))
  settings.check_batch(4)  # 24 = 3 x 2 x 4.
  with pytest.raises(ValueError, match=r'--config.batch_size=24: .*divisible by 16.*=16\.$'):
    settings.check_batch(8)
  with pytest.raises(ValueError, match=r'^--batch=24: .*e\.g\. --batch=16\.$'):
    settings.check_batch(8, flag='--batch')
  with pytest.raises(ValueError, match='positive'):
    run_setup.RunSettings.from_config(tiny_config(batch_size=0)).check_batch(1)
  with pytest.raises(ValueError, match='divisible'):
    run_setup.RunPlan.from_config(tiny_config(batch_size=12))  # Over the 8 devices.


def test_setup_builds_the_state_layout_and_a_step_that_trains():
  config = tiny_config(ema_decay=0.5)
  config.mesh.fsdp = 2
  setup = run_setup.make(config, 10, (8, 8, 3))
  assert setup.mesh.size == 8 and parallel.fsdp_size(setup.mesh) == 2
  assert setup.model_config.num_classes == 10 and setup.image_shape == (8, 8, 3)
  assert isinstance(setup.abstract, steps.EmaTrainState)
  key = jax.random.PRNGKey(0)
  state = setup.init_state(key)
  # The layout is parallel.state_shardings' for this mesh and rules; the state lies so.
  want = parallel.state_shardings(setup.abstract, setup.mesh, ())
  for got, expected, leaf in zip(
    jax.tree.leaves(setup.shardings), jax.tree.leaves(want), jax.tree.leaves(state)
  ):
    assert got == expected and leaf.sharding == expected
  abstract = setup.sharded_abstract()
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
    lambda x: (x.shape, x.dtype), state
  )
  assert jax.tree.leaves(abstract)[0].sharding == jax.tree.leaves(setup.shardings)[0]
  batch = parallel.shard_batch(
    {
      'image': np.zeros((32, 8, 8, 3), np.float32),
      'labels': np.eye(10, dtype=np.float32)[np.arange(32) % 10],
    },
    setup.mesh,
  )
  before = jax.tree.map(np.asarray, state.params)
  train_step = setup.train_step()
  for _ in range(2):  # The first step's learning rate is 0 (warm-up).
    state, metrics = train_step(state, batch, parallel.replicate(key, setup.mesh))
  assert int(state.step) == 2 and np.isfinite(float(metrics['loss']))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), before, state.params))
  assert max(moved) > 0
  sums = setup.eval_step()(state.params, {**batch, 'mask': jnp.ones((32,), bool)})
  assert int(sums['count']) == 32
  # From given parameters: the same layout, EMA starting at them.
  again = setup.state_from_params(before)
  np.testing.assert_array_equal(
    jax.tree.leaves(again.ema_params)[0], np.asarray(jax.tree.leaves(before)[0], np.float32)
  )


def test_train_memory_and_benchmark_use_the_one_set_up():
  """None of the three builds the optimiser, init function or shardings itself, and the batch
  check is only in run_setup."""
  sources = {
    'train': REPO / 'mixer_vit' / 'training' / 'train.py',
    'memory': REPO / 'mixer_vit' / 'training' / 'memory.py',
    'benchmark': REPO / 'mixer_vit' / 'benchmark.py',
  }
  for name, source in sources.items():
    tree = ast.parse(source.read_text())
    called = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    built_here = called & {
      'optim.make_optimizer',
      'optim.make_schedule',
      'steps.make_init_fn',
      'parallel.state_shardings',
      'steps.make_train_step',
      'steps.make_eval_step',
      'steps.ema_decay',
      'parallel.mesh_settings',
    }
    assert not built_here, (name, built_here)
    assert any(c.startswith(('run_setup.', 'plan.build', 'setup.')) for c in called), name
  for name in ('train', 'memory'):
    assert 'accum_steps (' not in sources[name].read_text()


def test_steps_accept_settings_or_the_config():
  config = tiny_config(accum_steps=2)
  assert steps.step_settings(config) == steps.StepSettings('softmax_xent', 2, None)
  settings = steps.StepSettings(accum_steps=2)
  assert steps.step_settings(settings) is settings
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config, schedule)
  mesh = parallel.mesh_from_config(config)
  model = run_setup.make(config, 10, (8, 8, 3)).model
  for given in (config, settings):
    assert callable(steps.make_train_step(model, tx, schedule, given, mesh))
