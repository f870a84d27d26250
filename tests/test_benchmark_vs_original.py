"""benchmark_vs_original: the side-by-side harness, run against a stand-in for the original code.

The real original (google-research/vision_transformer) is not part of the project; the stand-in
is a `vit_jax` package whose VisionTransformer is this project's model, so the plumbing (import
from a checkout, shared harness, alternation, the parameter-count check) is what is tested.
"""

import sys
import textwrap

import pytest

from mixer_vit import benchmark_vs_original as vs
from mixer_vit import models


def _fake_checkout(root, hidden_size):
  (root / 'vit_jax' / 'configs').mkdir(parents=True)
  (root / 'vit_jax' / '__init__.py').write_text('')
  (root / 'vit_jax' / 'configs' / '__init__.py').write_text('')
  (root / 'vit_jax' / 'configs' / 'models.py').write_text(
    f"MODEL_CONFIGS = {{'testing': {{'hidden_size': {hidden_size}}}}}\n"
  )
  (root / 'vit_jax' / 'models_vit.py').write_text(
    textwrap.dedent("""
      from mixer_vit import models

      def VisionTransformer(num_classes, **config):
        return models.build_model(models.get_model_config('testing', num_classes=num_classes, **config))
    """)
  )
  return str(root)


@pytest.fixture
def clean_modules(monkeypatch):
  """Each test imports its own stand-in `vit_jax`."""
  for name in [n for n in sys.modules if n == 'vit_jax' or n.startswith('vit_jax.')]:
    monkeypatch.delitem(sys.modules, name)
  yield
  for name in [n for n in sys.modules if n == 'vit_jax' or n.startswith('vit_jax.')]:
    del sys.modules[name]


@pytest.mark.parametrize('train', [True, False])
def test_times_both_models_in_one_harness(tmp_path, clean_modules, train):
  original = vs.load_original(_fake_checkout(tmp_path, 32), 'testing', 10)
  ours = models.build_model(models.get_model_config('testing', num_classes=10))
  result = vs.compare(original, ours, batch=4, train=train, rounds=2, resolution=32)
  assert result['parameters'] > 0
  assert set(result['images_per_second']) == {'original', 'ours'}
  assert all(s > 0 for s in result['seconds'].values())
  ratio = result['seconds']['original'] / result['seconds']['ours']
  assert result['ratio'] == pytest.approx(ratio)


def test_refuses_models_of_different_sizes(tmp_path, clean_modules):
  original = vs.load_original(_fake_checkout(tmp_path, 48), 'testing', 10)
  ours = models.build_model(models.get_model_config('testing', num_classes=10))
  with pytest.raises(ValueError, match='the models differ'):
    vs.compare(original, ours, batch=2, train=False, rounds=1, resolution=32)


def test_names_a_path_without_the_original_code(tmp_path, capsys):
  assert vs.main([f'--original={tmp_path}', '--model=ViT-Ti_16']) == 2
  assert 'no vit_jax/models_vit.py there' in capsys.readouterr().err
