"""EMA of the parameters (config.ema_decay): its closed form, the state without it, the files and
tools that carry it, exact resume, and turning it on for a run that had none."""

import json
import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
from test_train import compilation_cache_for_repeated_runs  # noqa: F401  (autouse fixture)
from test_train import flat
from test_train import tiny_config

from mixer_vit import evaluate
from mixer_vit import infer
from mixer_vit import workdir as workdir_lib
from mixer_vit.models import params_io
from mixer_vit.runtime import parallel
from mixer_vit.training import config_utils
from mixer_vit.training import metrics
from mixer_vit.training import steps
from mixer_vit.training import train

import param_trees

DECAY = 0.8
FROZEN = '(embedding|cls|Transformer/posembed_input)(/.*)?'


def _toy(ema, frozen='', abstract=False):
  """A tiny ViT's state (only shapes with ``abstract``: nothing compiled), its jitted train step
  on one device, one fixed batch and the dropout key."""
  config = config_utils.base_config()
  config.update(lr=0.1, warmup_steps=0, total_steps=10, ema_decay=DECAY if ema else 0.0)
  config.frozen = frozen
  _, model, schedule, tx, mesh = param_trees.tiny_vit_training(config)
  init = steps.make_init_fn(model, tx, (8, 8, 3), ema)
  if abstract:
    state = jax.eval_shape(init, jax.random.key(0))
  else:
    state = parallel.replicate(jax.jit(init)(jax.random.key(0)), mesh)
  step = steps.make_train_step(model, tx, schedule, config, mesh)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
    'labels': np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)],
  }
  return state, step, parallel.shard_batch(batch, mesh), parallel.replicate(jax.random.key(1), mesh)


def test_ema_equals_its_closed_form_and_frozen_parameters_keep_theirs():
  state, step, batch, key = _toy(ema=True, frozen=FROZEN)
  assert isinstance(state, steps.EmaTrainState)
  history = [flat(jax.device_get(state.params))]  # params_0, params_1, ...
  flat_ema0 = flat(jax.device_get(state.ema_params))
  for name, value in history[0].items():
    np.testing.assert_array_equal(flat_ema0[name], value, err_msg=name)  # EMA starts at params_0.
  n = 4
  for _ in range(n):
    state, _ = step(state, batch, key)
    history.append(flat(jax.device_get(state.params)))
  ema = flat(jax.device_get(state.ema_params))
  for name in ema:
    p = [h[name].astype(np.float64) for h in history]
    # ema_n = d^n p_0 + sum_k (1 - d) d^(n - k) p_k.
    expected = DECAY**n * p[0] + sum((1 - DECAY) * DECAY ** (n - k) * p[k] for k in range(1, n + 1))
    np.testing.assert_allclose(ema[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert ema[name].dtype == np.float32
  for name in ('embedding/kernel', 'cls', 'Transformer/posembed_input/pos_embedding'):
    np.testing.assert_array_equal(ema[name], history[-1][name], err_msg=name)  # Exactly.
  assert not np.allclose(ema['head/bias'], history[-1]['head/bias'])  # Lags behind the params.


def test_without_ema_the_state_is_the_plain_train_state():
  state, step, batch, key = _toy(ema=False, abstract=True)
  assert type(state) is steps.TrainState and steps.ema_params_of(state) is None
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert {p[0].name for p in paths} == {'step', 'params', 'opt_state'}
  after, _ = jax.eval_shape(step, state, batch, key)  # Traced, not compiled.
  assert type(after) is steps.TrainState
  with_ema = steps.with_ema(state, True)
  assert isinstance(with_ema, steps.EmaTrainState)
  without = steps.with_ema(with_ema, False)
  assert type(without) is steps.TrainState
  assert [p for p, _ in jax.tree_util.tree_flatten_with_path(without)[0]] == paths
  with pytest.raises(ValueError, match='ema_decay must be in'):
    steps.ema_decay(ml_collections.ConfigDict({'ema_decay': 1.0}))


def _config(**overrides):
  """The EMA runs' config (dropout on: its keys must follow the step)."""
  config = tiny_config(total_steps=8, checkpoint_every=4, eval_every=4, ema_decay=DECAY)
  config.model.dropout_rate = 0.1
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def ema_runs(tmp_path_factory):
  """The same EMA run uninterrupted and stopped at step 4, then resumed."""
  root = tmp_path_factory.mktemp('ema')
  full, parts = str(root / 'full'), str(root / 'parts')
  result = train.train_and_evaluate(_config(), full)
  assert train.train_and_evaluate(_config(), parts, stop_after_step=4)['stopped_early']
  train.train_and_evaluate(_config(), parts)
  return full, parts, result


def test_resume_with_ema_is_exact_and_metrics_hold_the_ema_evaluation(ema_runs):
  full, parts, result = ema_runs
  for name in (workdir_lib.PARAMS_FILE, workdir_lib.PARAMS_EMA_FILE):
    a = flat(params_io.load_npz(os.path.join(full, name)))
    b = flat(params_io.load_npz(os.path.join(parts, name)))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=f'{name}: {k}')
  rows = metrics.read_jsonl(os.path.join(full, workdir_lib.METRICS_FILE))
  evals = [r for r in rows if 'test_accuracy' in r]
  assert [r['step'] for r in evals] == [4, 8]
  assert all(0 <= r['test_accuracy_ema'] <= 1 and r['test_loss_ema'] > 0 for r in evals)
  assert result['test_accuracy_ema'] == evals[-1]['test_accuracy_ema']
  assert 'test_top5_accuracy_ema' in result  # 10 classes.
  resumed = metrics.read_jsonl(os.path.join(parts, workdir_lib.METRICS_FILE))
  assert [r['test_loss_ema'] for r in resumed if 'test_loss_ema' in r] == pytest.approx(
    [r['test_loss_ema'] for r in evals], rel=1e-5
  )
  manager = workdir_lib.make_manager(full, read_only=True)
  assert workdir_lib.has_ema(manager, 8)
  manager.close()


def test_infer_and_evaluate_pick_the_ema_with_a_flag(ema_runs, tmp_path, capsys):
  full, _, result = ema_runs
  trained = workdir_lib.load_workdir(full, ema=True)
  assert trained.ema and trained.step == 8
  npz_ema = flat(params_io.load_npz(os.path.join(full, workdir_lib.PARAMS_EMA_FILE)))
  for k, v in flat(trained.params).items():
    np.testing.assert_array_equal(v, npz_ema[k], err_msg=k)
  raw = flat(workdir_lib.load_workdir(full).params)
  assert not np.allclose(raw['head/kernel'], npz_ema['head/kernel'])

  image = str(tmp_path / 'digit.png')
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)).save(image)
  outputs = []
  for args in ([f'--checkpoint={full}'], [f'--checkpoint={full}', '--ema']):
    assert infer.main([*args, '--json', '--top_k=10', image]) == 0
    outputs.append(json.loads(capsys.readouterr().out)['predictions'])
  assert outputs[1] != outputs[0]  # Other parameters, other probabilities.
  clf = infer.load_classifier(full, ema=True)
  np.testing.assert_array_equal(clf.params['head']['kernel'], npz_ema['head/kernel'])
  # An .npz: params_ema.npz beside a workdir's params.npz (the model given by --model).
  params = os.path.join(full, workdir_lib.PARAMS_FILE)
  assert workdir_lib.ema_npz_path(params) == os.path.join(full, workdir_lib.PARAMS_EMA_FILE)
  with pytest.raises(ValueError, match='not .*other.npz'):
    workdir_lib.ema_npz_path(str(tmp_path / 'other.npz'))

  assert evaluate.main([f'--checkpoint={full}', '--ema', '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['top1'] == pytest.approx(result['test_accuracy_ema'], abs=1e-6)
  assert out['loss'] == pytest.approx(result['test_loss_ema'], rel=1e-5)


def test_a_run_without_ema_says_so_and_can_turn_it_on_only_on_purpose(ema_runs, tmp_path, capsys):
  workdir = str(tmp_path / 'plain')
  assert train.train_and_evaluate(_config(ema_decay=0.0), workdir, stop_after_step=4)['step'] == 4
  with pytest.raises(workdir_lib.WorkdirError, match='checkpoints/4 holds no EMA'):
    workdir_lib.load_workdir(workdir, ema=True)
  assert evaluate.main([f'--checkpoint={workdir}', '--ema']) == 2
  assert 'holds no EMA parameters' in capsys.readouterr().err
  ema_file = os.path.join(workdir, workdir_lib.PARAMS_EMA_FILE)
  with pytest.raises(FileNotFoundError, match=f'{ema_file} not found'):
    workdir_lib.ema_npz_path(os.path.join(workdir, workdir_lib.PARAMS_FILE))

  with pytest.raises(workdir_lib.ConfigChangeError, match='ema_decay: 0.0 -> 0.8'):
    train.train_and_evaluate(_config(), workdir)
  result = train.train_and_evaluate(_config(allow_config_change=True), workdir)
  assert result['step'] == 8 and 'test_accuracy_ema' in result  # EMA from step 4's parameters.
  assert workdir_lib.load_workdir(workdir, step=4).params  # The older checkpoint still loads.
  assert workdir_lib.load_workdir(workdir, ema=True).step == 8
  assert os.path.exists(ema_file)
  # Without EMA (turned off again) the final files drop the stale params_ema.npz.
  workdir_lib.save_params(workdir, workdir_lib.load_workdir(workdir).params)
  assert not os.path.exists(ema_file)
