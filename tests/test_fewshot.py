"""Few-shot probes: the ridge solutions, the choice of the shots, trained beats random init."""

import json
import os

import jax
import numpy as np
import pytest
from test_train import tiny_config

from mixer_vit import evaluate
from mixer_vit import workdir as workdir_lib
from mixer_vit.runtime import parallel
from mixer_vit.training import config_utils
from mixer_vit.training import fewshot
from mixer_vit.training import metrics
from mixer_vit.training import train


@pytest.mark.parametrize('n, dim', [(12, 4), (5, 9)])  # Both branches: N >= D and N < D.
def test_ridge_equals_lstsq_and_leave_one_out_equals_refitting(n, dim):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(n, dim)), rng.normal(size=(n, 3))
  regs = (0.1, 2.0)
  path = fewshot.ridge_path(x, y, regs)
  for j, l2 in enumerate(regs):
    # The intercept is not penalised: least squares on [x 1] over the rows [sqrt(l2) I 0].
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(l2) * np.eye(dim), np.zeros((dim, 1))]])
    b = np.concatenate([y, np.zeros((dim, 3))])
    solution = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(path.weights[j], solution[:dim], atol=1e-9)
    np.testing.assert_allclose(path.bias[j], solution[dim], atol=1e-9)
    for i in (0, n - 1):
      keep = np.arange(n) != i
      refit = fewshot.ridge_path(x[keep], y[keep], [l2])
      np.testing.assert_allclose(path.loo_scores[j, i], refit.scores(x[i : i + 1])[0, 0], atol=1e-9)


def test_the_shots_are_class_balanced_nested_and_fixed_by_the_seed():
  labels = np.repeat(np.arange(4), [7, 9, 6, 8])
  np.random.default_rng(1).shuffle(labels)
  chosen = fewshot.choose_shots(labels, 4, (1, 5), seed=3)
  for k, idx in chosen.items():
    assert np.bincount(labels[idx], minlength=4).tolist() == [k] * 4
  assert set(chosen[1]) <= set(chosen[5])
  again = fewshot.choose_shots(labels, 4, (1, 5), seed=3)
  other = fewshot.choose_shots(labels, 4, (1, 5), seed=4)
  assert np.array_equal(chosen[5], again[5]) and not np.array_equal(chosen[5], other[5])
  with pytest.raises(ValueError, match='classes .*have fewer'):
    fewshot.choose_shots(labels, 4, (7,), seed=0)


def test_bad_settings_name_the_key():
  config = config_utils.base_config()
  for key, value, match in [
    ('shots', (0, 5), 'config.fewshot.shots'),
    ('layer', 'head', 'config.fewshot.layer'),
    ('l2_regs', (1.0, -1.0), 'config.fewshot.l2_regs'),
    ('select', 'best', 'config.fewshot.select'),
  ]:
    bad = config.copy_and_resolve_references()
    bad.fewshot[key] = value
    with pytest.raises(ValueError, match=match):
      fewshot.FewShotConfig.from_config(bad)
  settings = fewshot.FewShotConfig.from_config(config)
  assert settings.every == 0 and settings.datasets[0].name == 'digits'
  assert fewshot.make_evaluator(config, None, None) is None  # Off by default.


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A short digits run (8 devices) that asks for the probes at its end (config.fewshot_every)."""
  workdir = str(tmp_path_factory.mktemp('fewshot_digits'))
  config = tiny_config(total_steps=200, warmup_steps=10, log_every=200, eval_every=200)
  config.checkpoint_every = 200
  config.fewshot_every = 200
  config.fewshot.shots = (5, 10)
  train.train_and_evaluate(config, workdir)
  return workdir


def test_a_trained_model_beats_a_random_one_and_the_command_prints_it(trained_workdir, capsys):
  argv = ['--checkpoint', trained_workdir, '--fewshot', '--shots=5,10', '--json']
  assert evaluate.main(argv) == 0
  rows = json.loads(capsys.readouterr().out)
  trained_acc = {row['name']: row['accuracy'] for row in rows}
  assert [(r['train_examples'], r['test_examples']) for r in rows] == [(50, 299), (100, 299)]

  trained = workdir_lib.load_workdir(trained_workdir)
  evaluator = fewshot.Evaluator(trained.config, trained.model, parallel.make_mesh())
  images = jax.numpy.zeros((1, *trained.image_shape))
  random_params = trained.model.init({'params': jax.random.PRNGKey(1)}, images, train=False)
  random_acc = evaluator.run(random_params['params'])
  assert set(trained_acc) == set(random_acc) == {'fewshot/digits_5shot', 'fewshot/digits_10shot'}
  for name, acc in trained_acc.items():  # Measured: 0.69 / 0.70 against 0.33 / 0.41.
    assert acc > random_acc[name] + 0.15, (trained_acc, random_acc)


def test_the_training_loop_logs_the_probes(trained_workdir):
  if not hasattr(train, 'fewshot'):
    pytest.skip('mixer_vit.training.train does not run the few-shot evaluator yet')
  rows = metrics.read_jsonl(os.path.join(trained_workdir, 'metrics.jsonl'))
  logged = [r for r in rows if 'fewshot/digits_5shot' in r]
  assert [r['step'] for r in logged] == [200]
  trained = workdir_lib.load_workdir(trained_workdir)
  again = fewshot.Evaluator(trained.config, trained.model).run(trained.params)
  for name, acc in again.items():
    assert logged[0][name] == pytest.approx(acc, abs=0.01)
