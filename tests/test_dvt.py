"""The Dynamic ViT cascade: stages that are plain ViTs, reuse, FLOPs, early exits, budgets, training."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from test_train import assert_trees_close
from test_train import compilation_cache_for_repeated_runs  # noqa: F401  (autouse fixture)
from test_train import losses
from test_train import tiny_config

from mixer_vit import attention
from mixer_vit import cli
from mixer_vit import evaluate
from mixer_vit import infer
from mixer_vit import models
from mixer_vit.models import dvt
from mixer_vit.models import dvt_adaptive
from mixer_vit.models import flops
from mixer_vit.models import params_io
from mixer_vit.training import train


def _images(n, size=16, seed=1):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


def _model(**overrides):
  config = models.get_model_config('testing-dvt', **overrides)
  model = models.build_model(config)
  params = model.init({'params': jax.random.key(0)}, _images(1))['params']
  return config, model, params


def _shaken(params, scale=0.3, seed=2):
  """Every parameter moved by noise: heads and reuse layers are no longer zero."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


def _vit_logits(config, k, stage_params, images):
  vit_config = dvt.stage_config(config, k)
  h, w = vit_config.image_size
  resized = jax.image.resize(images, (images.shape[0], h, w, 3), 'bilinear')
  return models.build_model(vit_config).apply({'params': stage_params}, resized)


def test_stages_are_plain_vits_with_reuse_off():
  config, model, params = _model(feature_reuse=False, relation_reuse=False)
  params = _shaken(params)
  assert set(params) == {'stage_0', 'stage_1'}
  images = _images(3)
  stages = model.apply({'params': params}, images, all_stages=True)
  assert stages.shape == (2, 3, 10)
  np.testing.assert_array_equal(model.apply({'params': params}, images), stages[-1])
  for k in range(2):
    vit_config = dvt.stage_config(config, k)
    assert vit_config.family == 'vit' and tuple(vit_config.image_size) == ((8, 8), (16, 16))[k]
    vit_params = models.build_model(vit_config).init(
      {'params': jax.random.key(0)}, jnp.zeros((1, *vit_config.image_size, 3))
    )['params']
    shapes = lambda t: {n: v.shape for n, v in params_io.flatten(t).items()}  # noqa: E731
    assert shapes(params[f'stage_{k}']) == shapes(vit_params)  # The ViT's names and shapes.
    np.testing.assert_allclose(
      stages[k], _vit_logits(config, k, params[f'stage_{k}'], images), rtol=1e-5, atol=1e-5
    )


def test_reuse_starts_at_zero_and_then_changes_the_next_stage():
  config, model, params = _model()
  assert {'feature_reuse_1', 'relation_reuse_1'} <= set(params)
  images = _images(3)
  stages = _shaken({k: v for k, v in params.items() if k.startswith('stage_')})
  fresh = model.apply({'params': {**params, **stages}}, images, all_stages=True)
  # Zero-initialised last layers: at the start each stage is its plain ViT.
  np.testing.assert_allclose(fresh[1], _vit_logits(config, 1, stages['stage_1'], images), atol=1e-5)
  for name in ('feature_reuse_1', 'relation_reuse_1'):
    moved = {**params, **stages, name: _shaken(params[name], seed=5)}
    out = model.apply({'params': moved}, images, all_stages=True)
    np.testing.assert_array_equal(out[0], fresh[0])  # Stage 0 reuses nothing.
    assert np.abs(out[1] - fresh[1]).max() > 1e-3, name


def test_resample_matrix_keeps_the_class_token_and_linear_ramps():
  m = dvt.resample_matrix((2, 2), (3, 3), cls=True)
  assert m.shape == (10, 5) and m[0, 0] == 1 and m[0, 1:].sum() == 0 and m[1:, 0].sum() == 0
  ramp = np.array([0.0, 1.0, 2.0, 3.0])  # Row-major 2x2 grid: value = 2 * row + col.
  expected = [2 * r + c for r in (0, 0.5, 1) for c in (0, 0.5, 1)]
  np.testing.assert_allclose(m[1:, 1:] @ ramp, expected)
  np.testing.assert_allclose(m.sum(axis=1), 1.0)


def test_flops_match_the_formula_counted_by_hand():
  config = models.get_model_config('testing-dvt')
  # testing-dvt: patch 4, width 32, MLP 64, 2 heads, 2 layers, 10 classes, reuse width 16;
  # stage 0 at 8x8 (2x2 tokens + class token = 5), stage 1 at 16x16 (4x4 + 1 = 17).
  stage0 = 4 * 48 * 32 + 2 * (4 * 5 * 32 * 32 + 2 * 5 * 5 * 32 + 2 * 5 * 32 * 64) + 32 * 10
  stage1 = 16 * 48 * 32 + 2 * (4 * 17 * 32 * 32 + 2 * 17 * 17 * 32 + 2 * 17 * 32 * 64) + 32 * 10
  feature = 5 * (32 * 16 + 16 * 32) + 17 * 5 * 32  # MLP at 5 tokens, resampling to 17.
  relation = 5 * 5 * (4 * 16 + 16 * 4) + 17 * 5 * 5 * 4 + 17 * 17 * 5 * 4  # 2 layers x 2 heads.
  assert dvt.stage_flops(config, 0) == 2 * stage0
  assert dvt.stage_flops(config, 1) == 2 * stage1
  assert dvt.reuse_flops(config, 0) == 0
  assert dvt.reuse_flops(config, 1) == 2 * (feature + relation)
  np.testing.assert_array_equal(
    dvt.exit_flops(config), [2 * stage0, 2 * (stage0 + stage1 + feature + relation)]
  )
  off = models.get_model_config('testing-dvt', feature_reuse=False, relation_reuse=False)
  assert dvt.reuse_flops(off, 1) == 0
  only = models.get_model_config('testing-dvt', relation_reuse=False)
  assert dvt.reuse_flops(only, 1) == 2 * feature


@pytest.fixture(scope='module')
def cascade():
  config, model, params = _model()
  params = _shaken(params, scale=0.5)
  images = np.asarray(_images(13, seed=3))
  stages = model.apply({'params': params}, images, all_stages=True)
  probs = np.asarray(jax.nn.softmax(stages, axis=-1))
  return config, model, params, images, probs


def test_threshold_one_is_the_last_stage_and_zero_the_first(cascade):
  _, model, params, images, probs = cascade
  runner = dvt_adaptive.AdaptiveCascade(model, params, batch_size=8)
  p, stage = runner.predict(images, [1.0])
  assert (stage == 1).all()
  np.testing.assert_allclose(p, probs[1], atol=1e-5)
  p, stage = runner.predict(images, [0.0])
  assert (stage == 0).all()
  np.testing.assert_allclose(p, probs[0], atol=1e-5)


def test_batched_exits_equal_one_image_at_a_time(cascade):
  _, model, params, images, probs = cascade
  threshold = float(np.median(probs[0].max(-1)))  # About half leave at stage 0.
  runner = dvt_adaptive.AdaptiveCascade(model, params, batch_size=8)
  assert runner.buckets == (1, 2, 4, 8)
  p, stage = runner.predict(images, [threshold])
  assert 0 < (stage == 0).sum() < len(images)
  one = dvt_adaptive.AdaptiveCascade(model, params, batch_size=1)
  for i in range(len(images)):  # Reference: each image alone through the cascade.
    p_i, stage_i = one.predict(images[i : i + 1], [threshold])
    assert stage_i[0] == stage[i]
    np.testing.assert_allclose(p_i[0], p[i], atol=1e-5)
  # The same exits and predictions as the rule applied to every stage's probabilities.
  np.testing.assert_array_equal(stage, dvt_adaptive.exit_stages(probs, [threshold]))
  np.testing.assert_allclose(p, probs[stage, np.arange(len(images))], atol=1e-5)


def test_budget_thresholds_meet_the_budget_on_the_held_out_examples():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 500, 10)) * np.array([1.0, 2.0, 4.0])[:, None, None]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  labels = rng.integers(0, 10, 500)
  labels[:250] = probs[2, :250].argmax(-1)  # The last stage knows more.
  flops = np.array([1e9, 3e9, 7e9])
  spent = []
  for budget in (1e9, 2e9, 3.5e9, 5e9, 8e9):
    point = dvt_adaptive.budget_thresholds(probs, labels, flops, budget)
    check = dvt_adaptive.operating_point(probs, labels, point['thresholds'], flops)
    assert check['mean_flops'] <= budget and check == {k: point[k] for k in check}
    spent.append(check['mean_flops'])
  assert spent[0] == 1e9 and spent[-1] > 5e9  # All leave first; a big budget is used.
  with pytest.raises(ValueError, match='below the first stage'):
    dvt_adaptive.budget_thresholds(probs, labels, flops, 0.5e9)


def test_a_vit_checkpoint_initialises_every_stage():
  config, model, params = _model()
  vit_config = dvt.stage_config(config, 1)
  vit_params = models.build_model(vit_config).init(
    {'params': jax.random.key(7)}, jnp.zeros((1, 16, 16, 3))
  )['params']
  vit_params = params_io.to_numpy(vit_params)
  loaded = models.load_pretrained(vit_params, params, config)
  block = 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'
  flat = params_io.flatten(loaded)
  for k in range(2):
    np.testing.assert_array_equal(flat[f'stage_{k}/{block}'], params_io.flatten(vit_params)[block])
    assert flat[f'stage_{k}/head/kernel'].shape == (32, 10)
  posemb = 'Transformer/posembed_input/pos_embedding'
  assert flat[f'stage_0/{posemb}'].shape == (1, 5, 32)  # Resized to stage 0's 2x2 grid.
  np.testing.assert_array_equal(flat[f'stage_1/{posemb}'], params_io.flatten(vit_params)[posemb])
  np.testing.assert_array_equal(
    flat['relation_reuse_1/Dense_0/kernel'], params['relation_reuse_1']['Dense_0']['kernel']
  )


def _dvt_config(**overrides):
  config = tiny_config('vit', **{'model_name': 'testing-dvt', 'total_steps': 8, **overrides})
  config.model.hidden_size = 16
  config.model.transformer = {'num_layers': 1, 'mlp_dim': 32, 'num_heads': 2}
  config.model.patches = {'size': (2, 2)}
  config.model.stage_sizes = ((4, 4), (8, 8))
  config.model.reuse_hidden = 8
  return config


def test_training_sums_the_stage_losses_logs_each_stage_and_resumes_exactly(tmp_path):
  config = _dvt_config(checkpoint_every=4, eval_every=4)
  config.model.dropout_rate = 0.1  # Keys must follow the step.
  full, parts = str(tmp_path / 'full'), str(tmp_path / 'parts')
  result = train.train_and_evaluate(config, full)
  assert 0 <= result['test_accuracy_stage0'] <= 1
  assert result['test_accuracy_stage1'] == result['test_accuracy']
  first = train.train_and_evaluate(config, parts, stop_after_step=4)
  assert first['stopped_early'] and first['step'] == 4
  second = train.train_and_evaluate(config, parts)
  assert second['step'] == 8
  assert losses(parts) == pytest.approx(losses(full), rel=1e-6)
  assert_trees_close(
    params_io.load_npz(os.path.join(parts, 'params.npz')),
    params_io.load_npz(os.path.join(full, 'params.npz')),
    rtol=1e-6,
    atol=1e-7,
  )
  # The logged loss is the sum of the stages' losses: weighting stage 0 by 0 lowers it.
  last_only = _dvt_config(total_steps=1, warmup_steps=0, stage_loss_weights=(0.0, 1.0))
  both = _dvt_config(total_steps=1, warmup_steps=0)
  train.train_and_evaluate(last_only, str(tmp_path / 'last'))
  train.train_and_evaluate(both, str(tmp_path / 'both'))
  one, two = losses(str(tmp_path / 'last')), losses(str(tmp_path / 'both'))
  assert one[1] == pytest.approx(np.log(10), rel=1e-4)  # Zero heads: uniform predictions.
  assert two[1] == pytest.approx(2 * np.log(10), rel=1e-4)


def test_stage_loss_weights_are_checked(tmp_path):
  with pytest.raises(ValueError, match='2 stages'):
    train.train_and_evaluate(_dvt_config(stage_loss_weights=(1.0, 1.0, 1.0)), str(tmp_path / 'a'))
  with pytest.raises(ValueError, match='family dvt'):
    train.train_and_evaluate(tiny_config(stage_loss_weights=(1.0,)), str(tmp_path / 'b'))
  with pytest.raises(ValueError, match='not all 0'):
    train.train_and_evaluate(_dvt_config(stage_loss_weights=(0.0, 0.0)), str(tmp_path / 'c'))


def test_evaluate_sweeps_and_meets_a_budget_and_other_models_refuse(tmp_path, capsys):
  workdir = str(tmp_path / 'dvt')
  train.train_and_evaluate(_dvt_config(total_steps=4), workdir)
  assert evaluate.main(['--checkpoint', workdir, '--sweep', '--json']) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert len(report['sweep']) == len(evaluate.SWEEP_THRESHOLDS) and len(report['stages']) == 2
  first, last = report['exit_gflops']
  assert report['sweep'][0]['mean_flops'] == pytest.approx(first * 1e9)  # Threshold 0.
  assert report['sweep'][-1]['exit_shares'] == [0.0, 1.0]  # Threshold 1.
  budget = (first + last) / 2
  args = ['--checkpoint', workdir, f'--budget={budget}', '--holdout_split=train[-200:]', '--json']
  assert evaluate.main(args) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['holdout']['examples'] == 200
  assert report['holdout']['mean_flops'] <= budget * 1e9
  vit = str(tmp_path / 'vit')
  train.train_and_evaluate(tiny_config(total_steps=1, warmup_steps=0), vit)
  assert evaluate.main(['--checkpoint', vit, '--budget=1']) == 2
  assert 'early exits need a Dynamic ViT cascade' in capsys.readouterr().err


def test_evaluate_draws_the_sweep_beside_a_single_model_and_keeps_other_files(tmp_path, capsys):
  workdir, vit = str(tmp_path / 'dvt'), str(tmp_path / 'vit')
  train.train_and_evaluate(_dvt_config(total_steps=2, warmup_steps=0), workdir)
  train.train_and_evaluate(tiny_config(total_steps=2, warmup_steps=0), vit)
  out = str(tmp_path / 'sweep.png')
  args = ['--checkpoint', workdir, '--sweep', f'--baseline={vit}', f'--out={out}']
  assert evaluate.main([*args, '--json']) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  (point,) = report['baselines']
  single = infer.load_classifier(vit)
  alone = evaluate.evaluate_classifier(single, evaluate.data_config(single))
  assert point['accuracy'] == pytest.approx(alone['top1'])
  assert point['examples'] == alone['examples'] == 299  # The digits test split, as the cascade's.
  assert point['mean_flops'] == flops.forward_flops(single.model_config, single.image_size) > 0
  assert cli.png_is_ours(out)
  assert evaluate.main(args) == 2  # An earlier picture: only with --overwrite.
  assert '--overwrite' in capsys.readouterr().err
  assert evaluate.main([*args, '--overwrite']) == 0
  assert 'wrote' in capsys.readouterr().out
  mine = tmp_path / 'mine.png'
  mine.write_bytes(b'not ours')
  assert evaluate.main([*args[:-1], f'--out={mine}', '--overwrite']) == 2
  assert 'never replaced' in capsys.readouterr().err and mine.read_bytes() == b'not ours'
  with pytest.raises(SystemExit):
    evaluate.main(['--checkpoint', workdir, f'--out={out}'])
  assert 'only with --sweep' in capsys.readouterr().err
  bad = str(tmp_path / 'missing')
  assert evaluate.main(['--checkpoint', workdir, '--sweep', f'--baseline={bad}']) == 2
  assert bad in capsys.readouterr().err


def test_infer_names_the_stage_each_image_left_at(tmp_path, capsys):
  workdir = str(tmp_path / 'dvt')
  train.train_and_evaluate(_dvt_config(total_steps=2, warmup_steps=0), workdir)
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    tf.io.write_file(
      str(folder / f'{i}.png'), tf.io.encode_png(rng.integers(0, 255, (8, 8, 3), np.uint8))
    )
  for thresholds, stage in (('0', 0), ('1', 1)):
    assert (
      infer.main(['--checkpoint', workdir, f'--thresholds={thresholds}', '--json', str(folder)])
      == 0
    )
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out if line.startswith('{')]
    assert [r['exit_stage'] for r in rows] == [stage] * 3
  assert infer.main(['--checkpoint', workdir, '--thresholds=0.5,0.5', str(folder)]) == 2
  assert 'one per stage but the last' in capsys.readouterr().err
  out_dir = str(tmp_path / 'maps')
  assert attention.main(['--checkpoint', workdir, f'--out_dir={out_dir}', str(folder)]) == 2
  assert 'is a Dynamic ViT cascade' in capsys.readouterr().err and not os.path.exists(out_dir)
