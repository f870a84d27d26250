"""Export for serving: SavedModel (TensorFlow) and ONNX (onnxruntime) against the JAX model."""

import importlib.util
import json
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mixer_vit import export
from mixer_vit import infer
from mixer_vit import models
from mixer_vit.models import params_io

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ('onnxruntime', 'onnx', 'jax2onnx'))
needs_onnx = pytest.mark.skipif(
  not HAVE_ONNX,
  reason='onnxruntime / onnx / jax2onnx not installed (pip install -r requirements.txt)',
)
HYBRID = {'resnet': {'num_layers': (1, 1), 'width_factor': 0.5}, 'patches': {'size': 1}}
RTOL = 1e-4


def _random_params(config, seed=0):
  """Random parameters of the model's shapes (no init: compiling it costs seconds per model)."""
  model = models.build_model(config)
  h, w = config.image_size
  shapes = jax.eval_shape(
    lambda: model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, h, w, 3)), train=False)
  )['params']
  rng = np.random.default_rng(seed)

  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return model, jax.tree.map(draw, shapes)


@pytest.fixture(scope='module')
def classifiers(tmp_path_factory):
  """A ViT and a Mixer read from .npz files as infer reads them, and a tiny R+ViT hybrid."""
  root = tmp_path_factory.mktemp('export')
  out = {}
  labels = root / 'labels.txt'
  labels.write_text(''.join(f'class {i}\n' for i in range(10)))
  for key, name in (('vit', 'testing'), ('mixer', 'testing-mixer')):
    _, params = _random_params(models.get_model_config(name))
    params_io.save_npz(params, str(root / f'{key}.npz'))
    out[key] = infer.load_classifier(str(root / f'{key}.npz'), name, labels=str(labels))
    out[key].npz = str(root / f'{key}.npz')
  config = models.get_model_config('testing', **HYBRID)
  model, params = _random_params(config)
  out['hybrid'] = infer.Classifier(
    model_config=config,
    model=model,
    params=params,
    image_size=(32, 32),
    pp='decode|resize((32, 32))|value_range(-1, 1)',
    class_names=None,
  )
  return out


@pytest.fixture(scope='module')
def saved_models(classifiers, tmp_path_factory):
  root = tmp_path_factory.mktemp('saved_models')
  return {
    key: export.export(clf, str(root / key), 'saved_model', top_k=3)
    for key, clf in classifiers.items()
  }


def _images(image_size, batch, seed):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, *image_size, 3)).astype(np.float32)


def _assert_close(got, want):
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) <= RTOL * np.max(np.abs(want)), (got, want)


@pytest.mark.parametrize('key', ['vit', 'hybrid', 'mixer'])
def test_saved_model_logits_equal_jax(saved_models, classifiers, key):
  loaded = tf.saved_model.load(saved_models[key])
  clf = classifiers[key]
  for batch in (1, 3):
    images = _images(clf.image_size, batch, seed=batch)
    got = loaded.signatures['logits'](images=tf.constant(images))['logits'].numpy()
    _assert_close(got, clf.logits(images))


@needs_onnx
@pytest.mark.parametrize('key', ['vit', 'hybrid', 'mixer'])
def test_onnx_logits_equal_jax(classifiers, key, tmp_path):
  clf = classifiers[key]
  path = export.export(clf, str(tmp_path / f'{key}.onnx'), 'onnx')
  for batch in (1, 3):
    images = _images(clf.image_size, batch, seed=batch)
    _assert_close(export.onnx_logits(path, images), clf.logits(images))


def test_bytes_signature_classifies_like_infer(saved_models, classifiers, tmp_path):
  clf = classifiers['vit']
  rng = np.random.default_rng(5)
  paths = []
  for i, (h, w) in enumerate([(40, 60), (32, 32), (90, 20)]):
    path = str(tmp_path / (f'{i}.png' if i % 2 else f'{i}.jpg'))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  want = list(infer.classify_files(clf, paths, top_k=3))
  serve = tf.saved_model.load(saved_models['vit']).signatures['serving_default']
  encoded = [open(p, 'rb').read() for p in paths]
  for batch in (encoded, encoded[:1]):
    got = serve(images=tf.constant(batch))
    assert got['labels'].shape == (len(batch), 3)
    for row, expected in enumerate(want[: len(batch)]):
      preds = expected['predictions']
      assert int(got['labels'][row, 0]) == preds[0]['label']
      assert (
        got['names'][row, 0].numpy().decode() == preds[0]['name'] == f'class {preds[0]["label"]}'
      )
      np.testing.assert_allclose(
        got['probabilities'][row].numpy(), [p['probability'] for p in preds], rtol=1e-4
      )
  # The export's facts are written beside it.
  with open(os.path.join(saved_models['vit'], export.INFO_FILE)) as f:
    info = json.load(f)
  assert info['image_size'] == [32, 32] and info['top_k'] == 3 and len(info['class_names']) == 10


def test_bytes_signature_on_a_real_photo(saved_models, classifiers, shared_data, tmp_path):
  """A CIFAR-10 photo (a real JPEG) gets infer's top-1 and probabilities from the SavedModel."""
  with tarfile.open(shared_data / 'cifar10-jpeg.tar.gz') as tar:
    member = next(m for m in tar if m.name.endswith('.jpg'))
    photo = tar.extractfile(member).read()
  path = tmp_path / 'photo.jpg'
  path.write_bytes(photo)
  (want,) = infer.classify_files(classifiers['vit'], [str(path)], top_k=3)
  serve = tf.saved_model.load(saved_models['vit']).signatures['serving_default']
  got = serve(images=tf.constant([photo]))
  assert [int(i) for i in got['labels'][0]] == [p['label'] for p in want['predictions']]
  np.testing.assert_allclose(
    got['probabilities'][0].numpy(), [p['probability'] for p in want['predictions']], rtol=1e-4
  )


def test_scan_models_are_unrolled_for_export(classifiers):
  config = models.get_model_config('testing', scan=True)
  model, params = _random_params(config)
  clf = infer.Classifier(config, model, params, (32, 32), 'decode|value_range(-1,1)', None)
  prepared = export.prepare(clf)
  assert not params_io.is_stacked(prepared.params)
  images = _images((32, 32), 2, seed=0)
  _assert_close(prepared.jax_logits(images), clf.logits(images))


def test_existing_out_is_refused_without_overwrite(tmp_path, capsys):
  out = tmp_path / 'model'
  out.mkdir()
  (out / 'mine.txt').write_text('a user file')
  base = ['--checkpoint=unused.npz', '--model=testing', '--format=saved_model', f'--out={out}']
  assert export.main(base) == 2
  assert '--overwrite' in capsys.readouterr().err
  # Not an earlier export: --overwrite does not delete it either.
  assert export.main([*base, '--overwrite']) == 2
  assert 'not written by mixer_vit' in capsys.readouterr().err
  assert (out / 'mine.txt').read_text() == 'a user file'
  assert export.main([*base[:2], '--format=onnx', f'--out={tmp_path}/no/such/dir/m.onnx']) == 2
  assert 'does not exist' in capsys.readouterr().err


def test_bad_arguments_name_the_flag(classifiers, tmp_path, capsys):
  args = [f'--checkpoint={classifiers["vit"].npz}', '--format=saved_model', f'--out={tmp_path}/sm']
  assert export.main(args) == 2
  assert '--model is required' in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:  # argparse refuses it, naming the flag.
    export.main([*args, '--model=testing', '--top_k=0'])
  assert exit_info.value.code == 2
  assert 'argument --top_k: 0 must be at least 1' in capsys.readouterr().err
  assert export.main([*args, '--model=testing', '--platforms=gpu']) == 2
  assert '--platforms=gpu' in capsys.readouterr().err
  # Preprocessing without a fixed size cannot feed the model.
  assert export.main([*args, '--model=testing', '--pp=decode|value_range(-1, 1)']) == 2
  assert 'resize((32, 32))' in capsys.readouterr().err
  assert not (tmp_path / 'sm').exists()


@needs_onnx
def test_onnx_overwrite_replaces_an_earlier_export(classifiers, tmp_path):
  out = str(tmp_path / 'm.onnx')
  export.export(classifiers['mixer'], out, 'onnx')
  with pytest.raises(export.ExportError, match='--overwrite'):
    export.export(classifiers['mixer'], out, 'onnx')
  first = os.path.getmtime(out)
  os.utime(out, (first - 100, first - 100))
  export.export(classifiers['mixer'], out, 'onnx', overwrite=True)
  assert os.path.getmtime(out) > first - 100
  assert sorted(os.listdir(tmp_path)) == ['m.onnx']  # No staging folder left behind.


def test_saved_model_overwrite_replaces_only_an_earlier_export(saved_models, tmp_path):
  earlier = saved_models['vit']
  assert export.saved_model_is_ours(earlier)
  with pytest.raises(export.ExportError, match='pass --overwrite'):
    export._check_out(earlier, 'saved_model', overwrite=False)
  export._check_out(earlier, 'saved_model', overwrite=True)  # Ours: may be replaced.
  theirs = tmp_path / 'theirs'
  theirs.mkdir()
  (theirs / 'saved_model.pb').write_bytes(b'someone else')  # A SavedModel we did not write.
  with pytest.raises(export.ExportError, match='not written by mixer_vit'):
    export._check_out(str(theirs), 'saved_model', overwrite=True)
