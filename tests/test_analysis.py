"""The "How do ViTs work?" analyses: eigenvalue solvers, band noise, the Fourier measure, the
landscape, the feature maps of every family, and each command on a digits workdir."""

import json
import os

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import tiny_config

from mixer_vit import models
from mixer_vit.analysis import __main__ as command
from mixer_vit.analysis import common
from mixer_vit.analysis import features
from mixer_vit.analysis import fourier
from mixer_vit.analysis import hessian
from mixer_vit.analysis import landscape
from mixer_vit.analysis import noise
from mixer_vit.analysis import variance
from mixer_vit.training import train

# ----------------------------------------------------------------------------------------------
# Eigenvalues.


def _quadratic(eigenvalues, seed=0):
  """0.5 w^T A w with A = Q diag(eigenvalues) Q^T: its Hessian is A."""
  dim = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
  a = (q * np.asarray(eigenvalues)) @ q.T
  return a, lambda w: 0.5 * w @ jnp.asarray(a, jnp.float32) @ w


def test_power_iteration_and_lanczos_find_the_eigenvalues_of_a_known_quadratic():
  eigenvalues = [4.0, 2.5, -1.5, 1.0, 0.5, 0.25, -0.2, 0.1]
  a, loss = _quadratic(eigenvalues)
  point = jnp.asarray(np.random.default_rng(1).normal(size=8), jnp.float32)  # H is constant.
  hvp = hessian.hvp_fn(loss, point)
  v = jnp.arange(8.0)
  np.testing.assert_allclose(hvp(v), a @ np.arange(8.0), rtol=1e-5, atol=1e-5)
  top, vector, _ = hessian.power_iteration(hvp, 8, jax.random.key(0), max_iterations=500, tol=1e-9)
  assert abs(top - 4.0) <= 1e-4 * 4.0
  assert abs(abs(vector @ np.linalg.eigh(a)[1][:, -1]) - 1.0) < 1e-3  # The top eigenvector.
  ritz = hessian.lanczos(hvp, 8, jax.random.key(1), 8)
  np.testing.assert_allclose(ritz, sorted(eigenvalues, reverse=True), rtol=1e-4, atol=1e-5)
  # Power iteration finds the largest magnitude, with its sign; top_eigenvalue the largest.
  _, loss = _quadratic([-3.0, 1.0, 0.5])
  hvp = hessian.hvp_fn(loss, jnp.zeros(3))
  dominant, _, _ = hessian.power_iteration(hvp, 3, jax.random.key(0), max_iterations=500, tol=1e-9)
  assert abs(dominant + 3.0) <= 1e-4 * 3.0
  top, negative, _ = hessian.top_eigenvalue(hvp, 3, jax.random.key(0), max_iterations=500, tol=1e-9)
  assert abs(top - 1.0) <= 1e-4 and negative == dominant
  hvp = hessian.hvp_fn(_quadratic(eigenvalues)[1], point)
  top, negative, _ = hessian.top_eigenvalue(hvp, 8, jax.random.key(0), tol=1e-9)
  assert abs(top - 4.0) <= 1e-4 * 4.0 and negative is None


def test_the_top_eigenvalue_is_found_when_a_negative_one_dominates_over_a_large_bulk():
  # A network's spectrum: one large positive and one larger negative eigenvalue over millions
  # near zero. After the shift by the negative one the bulk sits near the shift, where a
  # Rayleigh quotient that only has to stop changing settles far below the top.
  rng = np.random.default_rng(0)
  diagonal = jnp.asarray(
    np.concatenate([[-57.0, 44.0], rng.uniform(-1e-3, 1e-3, 2_000_000)]), jnp.float32
  )
  top, negative, _ = hessian.top_eigenvalue(
    lambda v: diagonal * v, diagonal.size, jax.random.key(0), max_iterations=500, tol=1e-4
  )
  assert abs(negative + 57.0) <= 1e-3 * 57.0
  assert abs(top - 44.0) <= 1e-2 * 44.0


def test_power_iteration_and_lanczos_match_the_exact_hessian_of_a_tiny_mlp():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=16))
  params = {
    'w1': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
    'b1': jnp.zeros(5),
    'w2': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
  }
  flat, unravel = ravel_pytree(params)

  def loss(w):
    p = unravel(w)
    logits = jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2']
    return jnp.mean(common.cross_entropy(logits, y))

  exact = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat), np.float64))
  largest = exact[np.argmax(np.abs(exact))]
  hvp = jax.jit(hessian.hvp_fn(loss, flat))
  dominant, _, _ = hessian.power_iteration(
    hvp, flat.size, jax.random.key(0), max_iterations=3000, tol=1e-10
  )
  assert abs(dominant - largest) <= 1e-4 * abs(largest)
  top, _, _ = hessian.top_eigenvalue(
    hvp, flat.size, jax.random.key(0), max_iterations=3000, tol=1e-10
  )
  assert abs(top - exact[-1]) <= 1e-4 * abs(exact[-1])
  ritz = hessian.lanczos(hvp, flat.size, jax.random.key(0), flat.size)
  assert abs(ritz[0] - exact[-1]) <= 1e-4 * abs(exact[-1])
  assert abs(ritz[-1] - exact[0]) <= 1e-4 * max(abs(exact[0]), abs(exact[-1]))


# ----------------------------------------------------------------------------------------------
# Noise and the Fourier measure.


@pytest.mark.parametrize('band', range(noise.NUM_BANDS))
def test_band_noise_is_in_its_band_with_the_requested_norm(band):
  shape = (3, 32, 32, 3)
  x = np.asarray(noise.band_noise(jax.random.key(band), shape, band, norm=5.0), np.float64)
  np.testing.assert_allclose(np.sqrt(np.sum(x**2, axis=(1, 2, 3))), 5.0, rtol=1e-4)
  energy = np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2
  inside = noise.band_mask(32, 32, band)[None, :, :, None]
  assert np.sum(energy * inside) / np.sum(energy) >= 0.99
  assert noise.band_mask(32, 32, band).any()  # 32 px: every band has frequencies.
  bands = sum(noise.band_mask(32, 32, b).astype(int) for b in range(noise.NUM_BANDS))
  assert np.all(bands == 1)  # The bands tile the spectrum.


def _blur(x):
  """3x3 box filter (circular)."""
  return sum(jnp.roll(x, (i, j), axis=(1, 2)) for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9


def test_fourier_change_is_negative_for_a_blur_and_positive_for_a_sharpening():
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 8))
  blurred = _blur(x)
  sharpened = x + 1.0 * (x - blurred)
  assert np.all(np.asarray(fourier.high_frequency_change(x, blurred)) < -0.5)
  assert np.all(np.asarray(fourier.high_frequency_change(x, sharpened)) > 0.5)
  assert np.allclose(fourier.high_frequency_change(x, 3.0 * x), 0.0, atol=1e-5)  # Scale-free.
  curve = np.asarray(fourier.relative_log_amplitude(x))
  assert curve.shape == (4, 9) and np.all(curve[:, 0] == 0)


# ----------------------------------------------------------------------------------------------
# Feature maps of every family.

FAMILIES = {
  'vit': ('testing', {'transformer': {'num_layers': 2, 'mlp_dim': 32, 'num_heads': 2}}),
  'hybrid': (
    'testing',
    {
      'resnet': {'num_layers': (1,), 'width_factor': 0.25, 'root': 'conv3', 'num_groups': 8},
      'patches': {'size': (2, 2)},
      'transformer': {'num_layers': 1, 'mlp_dim': 32, 'num_heads': 2},
    },
  ),
  'mixer': ('testing-mixer', {'patches': {'size': (2, 2)}}),
  'resnet': ('testing-resnet', {}),
  'alternet': ('testing-alternet', {}),
}
KINDS = {
  'vit': ['attention', 'mlp'] * 2,
  'hybrid': ['conv', 'attention', 'mlp'],
  'mixer': ['token_mixing', 'mlp'] * 2,
  'resnet': ['conv', 'conv'],
  'alternet': ['conv', 'conv', 'attention'],
}


def _subject(family, examples=16):
  name, overrides = FAMILIES[family]
  config = models.get_model_config(name, image_size=(8, 8), **overrides)
  model = models.build_model(config)
  images = np.asarray(
    jax.random.uniform(jax.random.key(1), (examples, 8, 8, 3), minval=-1, maxval=1), np.float32
  )
  params = jax.device_get(jax.jit(model.init)({'params': jax.random.key(0)}, images[:1]))['params']
  # A non-zero head, so that the loss depends on every parameter.
  rng = np.random.default_rng(2)
  params['head'] = {
    k: 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in params['head'].items()
  }
  labels = np.arange(examples) % 10
  return common.Subject(config, model, jax.device_get(params), images, labels, 'random', 'x', 'y')


@pytest.mark.parametrize('family', FAMILIES)
def test_every_family_gives_its_sub_blocks_and_the_models_own_numbers(family):
  subject = _subject(family, examples=4)
  config, model, params = subject.model_config, subject.model, subject.params
  grid = features.token_grid(config, (8, 8))

  def run(p, x):
    return features.capture(model, p, x, config, grid)

  kinds = [kind for _, kind in features.block_names(model, params, subject.images.shape, config)]
  assert kinds == KINDS[family]
  logits, blocks = jax.jit(run)(params, subject.images)
  assert all(b.output.ndim == 4 for b in blocks)
  expected, out = jax.jit(lambda p, x: models.apply_with_intermediates(model, p, x))(
    params, subject.images
  )
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  last = np.asarray(blocks[-1].output)
  if family in ('vit', 'hybrid', 'mixer'):
    # The rebuilt residual stream ends in the model's own last block output.
    tokens = np.asarray(out['blocks'][-1])
    if config.get('classifier') == 'token':
      tokens = tokens[:, 1:]
    np.testing.assert_allclose(last.reshape(tokens.shape), tokens, atol=1e-5)
  else:
    np.testing.assert_allclose(last.mean(axis=(1, 2)), out['pre_logits'], atol=1e-5)
  # Each block starts where the last ended (a hybrid's patch embedding sits after its stem).
  for a, b in zip(blocks, blocks[1:]):
    if not (family == 'hybrid' and a.kind == 'conv'):
      np.testing.assert_array_equal(a.output, b.input)


def test_fourier_and_variance_run_on_a_convolutional_family():
  family = 'alternet'
  subject = _subject(family)
  result = fourier.analyse(subject, batch_size=8)
  assert [r['kind'] for r in result['blocks']] == ['input'] + KINDS[family]
  assert result['blocks'][0]['depth'] == 0 and result['blocks'][-1]['depth'] == 1
  rows = variance.analyse(subject, batch_size=8)['blocks']
  assert all(r['variance'] > 0 for r in rows)
  assert rows[1]['input_variance'] == pytest.approx(rows[0]['variance'], rel=1e-5)


def test_first_takes_a_prefix_of_the_examples_and_keeps_the_model():
  subject = _subject('vit', examples=8)
  part = subject.first(3)
  np.testing.assert_array_equal(part.images, subject.images[:3])
  np.testing.assert_array_equal(part.labels, subject.labels[:3])
  assert part.params is subject.params and part.model is subject.model
  assert part.describe() == {**subject.describe(), 'examples': 3}
  assert len(subject.labels) == 8  # The subject itself is unchanged.


def test_filter_normalised_directions_and_the_landscape_centre_is_the_models_loss():
  subject = _subject('vit', examples=24)
  direction = landscape.filter_normalised_direction(0, subject.params)
  for w, d in zip(jax.tree.leaves(subject.params), jax.tree.leaves(direction)):
    w, d = np.asarray(w), np.asarray(d)
    if w.ndim <= 1:
      assert not d.any()
    else:
      axes = tuple(range(w.ndim - 1))
      np.testing.assert_allclose(np.sqrt((d**2).sum(axes)), np.sqrt((w**2).sum(axes)), rtol=1e-4)
  result = landscape.analyse(subject, dims=2, steps=3, span=0.5, batch_size=16)
  logits = subject.model.apply({'params': subject.params}, subject.images)
  loss = float(jnp.mean(common.cross_entropy(logits, jnp.asarray(subject.labels))))
  assert result['loss'][1][1] == pytest.approx(loss, rel=1e-5)
  assert result['loss_at_origin'] == result['loss'][1][1]
  assert result['loss'][0][0] != pytest.approx(loss, rel=1e-3)  # Moving changes the loss.


# ----------------------------------------------------------------------------------------------
# The command on a digits workdir.


@pytest.fixture(scope='module')
def digits_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('analysis_digits'))
  config = tiny_config(total_steps=40, warmup_steps=4, log_every=40, checkpoint_every=40)
  train.train_and_evaluate(config, workdir)
  return workdir


ARGS = {
  'fourier': [],
  'variance': [],
  'noise': ['--noise_rms=0.2'],
  'hessian': ['--batch_size=16', '--batches=2', '--iterations=20', '--lanczos=4'],
  'landscape': ['--dims=1', '--steps=5', '--span=0.5'],
}


@pytest.mark.parametrize('analysis', list(ARGS))
def test_every_command_writes_its_picture_and_numbers(digits_workdir, tmp_path, capsys, analysis):
  out = str(tmp_path / f'{analysis}.png')
  argv = [analysis, f'--checkpoint={digits_workdir}', f'--out={out}', '--examples=64']
  assert command.main(argv + ARGS[analysis] + ['--json']) == 0
  printed = json.loads(capsys.readouterr().out)
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(common.json_path(out)) as f:
    result = json.load(f)
  assert result.pop('software').startswith('mixer_vit') and result == printed
  assert result['analysis'] == analysis and result['family'] == 'vit'
  assert result['dataset'] == 'digits'
  assert result['split'] == ('train' if analysis in ('hessian', 'landscape') else 'test')
  if analysis == 'hessian':
    assert len(result['batches']) == 2 and result['top_max'] > 0
    # Few iterations on an early model: the two methods agree roughly.
    assert result['batches'][0]['lanczos'][0] == pytest.approx(result['batches'][0]['top'], 0.1)
  elif analysis == 'noise':
    bands = [b for b in result['bands'] if b['drop'] is not None]
    assert 0 < len(bands) < 10  # 8x8 images: some bands have no frequency.
  elif analysis == 'landscape':
    assert len(result['loss']) == 5 and result['loss_at_origin'] == result['loss'][2]
  else:
    assert [b['kind'] for b in result['blocks']] == ['input', 'attention', 'mlp']
  # Never overwritten: a second run refuses in one line and leaves the files as they were.
  before = os.path.getmtime(out), open(common.json_path(out)).read()
  assert command.main(argv + ARGS[analysis]) == 2
  error = capsys.readouterr().err
  assert error.count('\n') == 1 and '--overwrite' in error and out in error
  assert (os.path.getmtime(out), open(common.json_path(out)).read()) == before
  # A user's file at --out is never replaced, not even with --overwrite.
  photo = tmp_path / 'photo.png'
  photo.write_bytes(b'not ours')
  argv = [analysis, f'--checkpoint={digits_workdir}', f'--out={photo}', '--overwrite']
  assert command.main(argv) == 2
  assert 'not written by mixer_vit' in capsys.readouterr().err
  assert photo.read_bytes() == b'not ours'


def test_scanned_mixed_precision_models_are_analysed_unrolled_in_float32():
  config = models.get_model_config(
    'testing-mixer', image_size=(8, 8), scan=True, remat=True, matmul_dtype='bfloat16'
  )
  model = models.build_model(config)
  images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
  stacked = jax.device_get(jax.jit(model.init)({'params': jax.random.key(0)}, images)['params'])
  assert 'MixerBlock' in stacked
  stacked['head']['kernel'] = np.random.default_rng(0).normal(size=(32, 10)).astype(np.float32)
  plain, module, params = common.unrolled(config, stacked)
  assert (plain.scan, plain.remat, plain.matmul_dtype) == (False, False, None)
  assert 'MixerBlock_1' in params and 'MixerBlock' not in params
  assert len(features.block_names(module, params, images.shape, plain)) == 4
  # The trained model's numbers, up to its bfloat16 products.
  logits = np.asarray(module.apply({'params': params}, images))
  np.testing.assert_allclose(logits, model.apply({'params': stacked}, images), rtol=0.05, atol=0.05)
  assert np.abs(logits).max() > 0.5


def test_compare_overlays_one_analysis_of_several_runs_and_refuses_mixed_or_foreign_files(
  digits_workdir, tmp_path, capsys
):
  outputs = {}
  for analysis, extra in (('noise', ['--noise_rms=0.2']), ('variance', [])):
    for seed in (0, 1):
      out = str(tmp_path / f'{analysis}{seed}.png')
      argv = [analysis, f'--checkpoint={digits_workdir}', f'--out={out}', '--examples=32']
      assert command.main(argv + extra + [f'--seed={seed}']) == 0
      outputs[analysis, seed] = common.json_path(out)
  capsys.readouterr()
  noise_files = [outputs['noise', 0], outputs['noise', 1]]
  out = str(tmp_path / 'compare.png')
  assert command.main(['compare', *noise_files, '--labels=first,second', f'--out={out}']) == 0
  printed = capsys.readouterr().out
  with open(common.json_path(out)) as f:
    result = json.load(f)
  assert result['of'] == 'noise' and result['labels'] == ['first', 'second']
  with open(noise_files[1]) as f:
    second = json.load(f)
  high = [b['drop'] for b in second['bands'] if b['band'] in (7, 8, 9) and b['drop'] is not None]
  expected_high = float(np.mean(high)) if high else None
  assert result['summaries'][1]['drop 0.7-1π'] == expected_high
  assert result['summaries'][1]['clean accuracy'] == second['clean_accuracy']
  rows = result['table'].splitlines()
  assert len(rows) == 4 and rows[2].startswith('| first |') and rows[3].startswith('| second |')
  assert result['table'] in printed
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # Variance summaries: the mean ratio per block kind, as the analysis computed it.
  out = str(tmp_path / 'compare_variance.png')
  assert command.main(['compare', outputs['variance', 0], f'--out={out}']) == 0
  with open(outputs['variance', 0]) as f:
    ratios = json.load(f)['mean_ratio_by_kind']
  with open(common.json_path(out)) as f:
    summary = json.load(f)['summaries'][0]
  assert summary == {f'variance ratio {kind}': value for kind, value in ratios.items()}
  capsys.readouterr()
  # Two analyses, a file the command did not write, a label count that does not match, a
  # checkpoint given to compare: one line each, nothing written.
  foreign = tmp_path / 'mine.json'
  foreign.write_text('{"analysis": "noise"}')
  refused = tmp_path / 'refused.png'
  for argv, words in (
    (['compare', outputs['noise', 0], outputs['variance', 0]], 'different analyses'),
    (['compare', outputs['noise', 0], str(foreign)], 'mine.json'),
    (['compare', *noise_files, '--labels=one'], '--labels'),
  ):
    assert command.main([*argv, f'--out={refused}']) == 2
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and words in error
    assert not refused.exists()
  with pytest.raises(SystemExit):
    command.main(['compare', *noise_files, f'--checkpoint={digits_workdir}', f'--out={refused}'])
  assert '--checkpoint' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    command.main(['fourier', noise_files[0], f'--checkpoint={digits_workdir}', f'--out={refused}'])
  assert 'no file arguments' in capsys.readouterr().err
