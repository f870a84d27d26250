"""Benchmark: FLOP counting, the matmul peak and the timed steps (tiny sizes)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_vit import benchmark
from mixer_vit import models

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_xla_counts_a_matmul_as_two_n_cubed():
  n = 128
  x = jnp.ones((n, n), jnp.float32)
  compiled = jax.jit(lambda a, b: a @ b).lower(x, x).compile()
  assert benchmark.xla_flops(compiled) == pytest.approx(2 * n**3, rel=0.01)


@pytest.mark.parametrize(
  'name, overrides',
  [
    ('testing', {}),
    ('testing', {'classifier': 'gap', 'representation_size': 16}),
    ('testing', {'classifier': 'map'}),
    ('testing', {'resnet': {'num_layers': (1, 1), 'width_factor': 0.5}, 'patches': {'size': 1}}),
    ('testing-mixer', {}),
    ('testing-resnet', {}),
  ],
)
def test_analytic_flops_agree_with_xla(name, overrides):
  config = models.get_model_config(name, **overrides)
  model = models.build_model(config)
  x = jnp.zeros((2, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, x, train=False))[
    'params'
  ]
  compiled = (
    jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)).lower(params, x).compile()
  )
  xla = benchmark.xla_flops(compiled)
  analytic = benchmark.analytic_flops(config, (32, 32), 2)
  # XLA also counts softmax, norms, GELU and biases; the matmuls dominate.
  assert analytic <= xla <= 1.3 * analytic
  assert benchmark.analytic_flops(config, (32, 32), 2, train=True) == 3 * analytic


def test_analytic_flops_of_vit_b16_match_the_published_count():
  # ViT-B/16 at 224: about 17.6 G multiply-adds per image (the "17.6 GFLOPs" usually quoted),
  # i.e. 35.1 GFLOP counting a multiply-add as two.
  config = models.get_model_config('ViT-B_16')
  assert benchmark.analytic_flops(config, (224, 224), 1) / 1e9 == pytest.approx(35.1, rel=0.02)


def test_matmul_peak_is_measured():
  peak = benchmark.matmul_peak(jnp.float32, size=256, runs=3, warmup=1)
  assert peak['size'] == 256
  assert peak['seconds'] > 0
  assert peak['flops_per_second'] == pytest.approx(2 * 256**3 / peak['seconds'])


@pytest.mark.parametrize('train', [False, True])
def test_benchmark_of_a_tiny_model(train):
  result = benchmark.benchmark(
    'testing',
    batch=8,
    train=train,
    num_classes=10,
    runs=3,
    warmup=1,
    matmul_size=256,
    matmul_runs=2,
  )
  assert result.mode == ('train' if train else 'inference')
  assert result.resolution == (32, 32)
  assert len(result.step_seconds_all) == 3
  assert result.step_seconds_median == float(np.median(result.step_seconds_all))
  assert result.images_per_second == pytest.approx(8 / result.step_seconds_median)
  assert result.compile_seconds > 0
  assert result.flops_source.startswith('XLA cost analysis')
  # Training counts forward, backward and the update: about 3x the forward pass.
  ratio = result.flops_per_step / result.analytic_flops_per_step
  assert 0.9 < ratio < 1.5
  assert result.share_of_peak == pytest.approx(
    result.achieved_flops_per_second / result.matmul_peak_flops_per_second
  )
  assert 'images/s' in result.summary()


def test_command_prints_json(capsys):
  rc = benchmark.main(
    [
      '--model=testing',
      '--batch=8',
      '--runs=2',
      '--warmup=1',
      '--matmul_size=128',
      '--num_classes=10',
      '--resolution=16,24',
      '--json',
    ]
  )
  assert rc == 0
  result = json.loads(capsys.readouterr().out)
  assert result['resolution'] == [16, 24] and result['batch'] == 8
  assert result['images_per_second'] > 0
  assert benchmark.main(['--model=testing', '--batch=7']) == 2  # Not a multiple of 8 devices.
  assert 'multiple' in capsys.readouterr().err


def test_mixed_prints_float32_and_mixed_precision_side_by_side(capsys):
  args = ['--model=testing', '--batch=8', '--runs=2', '--warmup=1', '--matmul_size=128']
  assert benchmark.main([*args, '--num_classes=10', '--train', '--mixed']) == 0
  out = capsys.readouterr().out
  assert 'float32, ' in out and 'mixed precision (bfloat16 multiplies, float32 elsewhere)' in out
  assert 'jnp.dot, bfloat16' in out  # The mixed run is measured against the bfloat16 peak.
  assert 'mixed precision / float32: ' in out
  assert benchmark.main([*args, '--mixed', '--dtype=bfloat16']) == 2
  assert 'leave --dtype out' in capsys.readouterr().err


@pytest.mark.parametrize(
  'flag', ['--batch=0', '--batch=-8', '--runs=0', '--num_classes=0', '--matmul_size=0', '--fsdp=0']
)
def test_non_positive_sizes_are_refused_in_one_line_naming_the_flag(capsys, flag):
  assert benchmark.main(['--model=testing', flag]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f'error: {flag}:'), err
  assert 'images/s' not in captured.out


def test_benchmark_and_memory_import_without_tensorflow():
  """A GPU machine without TensorFlow: both modules (and the run set-up) import and the benchmark
  parses its flags, with every ``tensorflow`` import made to fail."""
  code = textwrap.dedent(
    """
    import sys

    class Blocked:
      def find_spec(self, name, path=None, target=None):
        if name == 'tensorflow' or name.startswith('tensorflow.'):
          raise ImportError('blocked: ' + name)

    sys.meta_path.insert(0, Blocked())
    from mixer_vit import benchmark, models  # noqa: F401
    from mixer_vit.training import memory, run_setup, steps  # noqa: F401
    assert not any(m == 'tensorflow' or m.startswith('tensorflow.') for m in sys.modules)
    assert benchmark.main(['--model=testing', '--batch=0']) == 2
    print('imported without tensorflow')
    """
  )
  env = {**os.environ, 'MIXER_VIT_TCMALLOC': '0'}
  done = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'imported without tensorflow' in done.stdout


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='cuDNN may run on a GPU')
def test_attention_impl_flag_reaches_the_model_and_cudnn_elsewhere_fails_in_one_line(capsys):
  args = ['--model=testing', '--batch=8', '--runs=1', '--warmup=0', '--matmul_size=64']
  assert benchmark.main([*args, '--num_classes=10', '--attention_impl=cudnn']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "attention_impl='cudnn' cannot run here" in err, err
  assert benchmark.main([*args, '--num_classes=10', '--attention_impl=xla', '--json']) == 0
  assert json.loads(capsys.readouterr().out)['images_per_second'] > 0
