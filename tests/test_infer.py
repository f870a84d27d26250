"""Inference and evaluation commands: .npz files and training workdirs, bad files, class names."""

import json
import os

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mixer_vit import evaluate
from mixer_vit import infer
from mixer_vit import models
from mixer_vit.models import params_io

import param_trees


def _random_params(config, seed=0):
  """Initialised parameters with a random (not zero) head, so predictions differ per image."""
  model = models.build_model(config)
  h, w = config.image_size
  params = model.init(
    {'params': jax.random.PRNGKey(seed)}, np.zeros((1, h, w, 3), np.float32), train=False
  )['params']
  params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(seed)
  params['head']['kernel'] = rng.normal(size=params['head']['kernel'].shape).astype(np.float32)
  return model, params


def _write_images(folder, rng, sizes):
  paths = []
  for i, (h, w) in enumerate(sizes):
    path = os.path.join(folder, f'img{i}.png' if i % 2 else f'img{i}.jpg')
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


@pytest.fixture(scope='module')
def npz_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('npz')
  # Trained at 48x48 (a 12x12 grid of 4x4 patches), not the registry's 32x32.
  config = models.get_model_config('testing', num_classes=7, image_size=(48, 48))
  model, params = _random_params(config)
  path = str(root / 'model.npz')
  params_io.save_npz(params, path)
  images = root / 'images'
  (images / 'sub').mkdir(parents=True)
  rng = np.random.default_rng(1)
  good = _write_images(str(images), rng, [(60, 40), (48, 48), (20, 90)])
  good += _write_images(str(images / 'sub'), rng, [(48, 20), (33, 33)])
  (images / 'broken.jpg').write_bytes(b'this is not a jpeg')
  (images / 'notes.txt').write_text('not an image; skipped in folders')
  labels = root / 'labels.txt'
  labels.write_text(''.join(f'class {i}\n' for i in range(7)))
  return {
    'root': root,
    'npz': path,
    'model': model,
    'params': params,
    'images': images,
    'good': good,
    'labels': str(labels),
  }


def test_resolution_and_class_count_come_from_the_checkpoint(npz_setup):
  clf = infer.load_classifier(npz_setup['npz'], 'testing', labels=npz_setup['labels'])
  assert clf.image_size == (48, 48)
  assert clf.num_classes == 7
  assert clf.class_name(3) == 'class 3'


def test_predictions_equal_the_model_on_resized_images(npz_setup):
  clf = infer.load_classifier(npz_setup['npz'], 'testing')
  path = npz_setup['good'][4]  # A PNG (lossless), 33x33: resized up to 48x48.
  assert path.endswith('.png')
  with Image.open(path) as im:
    pixels = np.asarray(im.convert('RGB'))
  # The evaluation preprocessing written out by hand: resize to 48x48 (bilinear, back to uint8),
  # then [0, 255] -> [-1, 1].
  resized = tf.cast(
    tf.clip_by_value(tf.round(tf.image.resize(pixels, (48, 48))), 0, 255), tf.uint8
  ).numpy()
  x = resized.astype(np.float32) / 127.5 - 1.0
  logits = npz_setup['model'].apply({'params': npz_setup['params']}, x[None], train=False)
  expected = np.asarray(jax.nn.softmax(logits[0]))
  (result,) = list(infer.classify_files(clf, [path], top_k=7, batch_size=4))
  got = {p['label']: p['probability'] for p in result['predictions']}
  np.testing.assert_allclose([got[i] for i in range(7)], expected, rtol=1e-4, atol=1e-6)


def test_command_on_a_folder_reports_bad_files_and_classifies_the_rest(npz_setup, capsys):
  rc = infer.main(
    [
      f'--checkpoint={npz_setup["npz"]}',
      '--model=testing',
      f'--labels={npz_setup["labels"]}',
      '--top_k=3',
      '--batch_size=2',
      '--json',
      str(npz_setup['images']),
    ]
  )
  out, err = capsys.readouterr()
  assert rc == 1  # One file failed.
  assert 'broken.jpg' in err
  results = [json.loads(line) for line in out.strip().splitlines()]
  by_file = {r['file']: r for r in results}
  assert set(by_file) == set(npz_setup['good']) | {str(npz_setup['images'] / 'broken.jpg')}
  assert 'error' in by_file[str(npz_setup['images'] / 'broken.jpg')]
  for path in npz_setup['good']:
    preds = by_file[path]['predictions']
    assert len(preds) == 3
    probs = [p['probability'] for p in preds]
    assert probs == sorted(probs, reverse=True)
    assert 0 < sum(probs) <= 1 + 1e-6
    assert all(p['name'] == f'class {p["label"]}' for p in preds)
  # Different images, different outputs: the head is random, so identical outputs would mean
  # the images were not fed.
  assert (
    len(
      {
        tuple(round(p['probability'], 6) for p in by_file[f]['predictions'])
        for f in npz_setup['good']
      }
    )
    > 1
  )


def test_text_output_and_clear_errors(npz_setup, capsys):
  rc = infer.main(
    [f'--checkpoint={npz_setup["npz"]}', '--model=testing', '--top_k=2', npz_setup['good'][1]]
  )
  out, _ = capsys.readouterr()
  assert rc == 0
  lines = out.strip().splitlines()
  assert lines[0] == npz_setup['good'][1] and len(lines) == 3
  assert infer.main([f'--checkpoint={npz_setup["npz"]}', npz_setup['good'][1]]) == 2
  assert '--model is required' in capsys.readouterr().err
  bad_labels = npz_setup['root'] / 'three.txt'
  bad_labels.write_text('a\nb\nc\n')
  assert (
    infer.main(
      [
        f'--checkpoint={npz_setup["npz"]}',
        '--model=testing',
        f'--labels={bad_labels}',
        npz_setup['good'][1],
      ]
    )
    == 2
  )
  assert '3 names but the checkpoint has 7' in capsys.readouterr().err


def test_non_square_checkpoint_with_resolution_flag(tmp_path):
  config = models.get_model_config('testing', num_classes=5, image_size=(16, 40))
  _, params = _random_params(config)
  path = str(tmp_path / 'wide.npz')
  params_io.save_npz(params, path)
  with pytest.raises(ValueError):  # 4x10 grid: not square, so the size must be given.
    infer.load_classifier(path, 'testing')
  clf = infer.load_classifier(path, 'testing', resolution=(16, 40))
  assert clf.image_size == (16, 40)
  img = _write_images(str(tmp_path), np.random.default_rng(0), [(30, 70)])
  (result,) = list(infer.classify_files(clf, img, top_k=5))
  assert len(result['predictions']) == 5


def test_inference_pp_keeps_the_eval_ops_and_drops_labels():
  assert (
    infer.inference_pp('decode|resize(256)|central_crop(224)|value_range(-1,1)|onehot', (224, 224))
    == 'decode|resize(256)|central_crop(224)|value_range(-1,1)'
  )
  assert (
    infer.inference_pp('value_range(-1,1)|onehot(10)', (8, 8))
    == 'decode|resize((8, 8))|value_range(-1,1)'
  )


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A very short digits training run of the tiny model (its checkpoint and config)."""
  return param_trees.train_tiny_digits(tmp_path_factory.mktemp('wd') / 'run')


def test_workdir_inference_uses_its_names_and_preprocessing(workdir, tmp_path, capsys):
  path, _ = workdir
  clf = infer.load_classifier(path)
  assert clf.image_size == (16, 16)
  assert clf.class_names == [str(i) for i in range(10)]
  assert clf.pp == 'decode|resize(16)|value_range(-1,1)'
  img = _write_images(str(tmp_path), np.random.default_rng(0), [(8, 8), (28, 28)])
  assert infer.main([f'--checkpoint={path}', '--top_k=10', '--json', *img]) == 0
  results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [r['file'] for r in results] == img
  for r in results:
    assert sorted(p['name'] for p in r['predictions']) == [str(i) for i in range(10)]
    np.testing.assert_allclose(sum(p['probability'] for p in r['predictions']), 1.0, rtol=1e-5)
  assert infer.main([f'--checkpoint={path}', '--model=testing-mixer', *img]) == 2


def test_evaluate_matches_the_trainer_and_counts_every_example(workdir, capsys):
  path, trained = workdir
  assert evaluate.main([f'--checkpoint={path}', '--json']) == 0
  result = json.loads(capsys.readouterr().out)
  assert result['examples'] == 299  # The digits test split, each example once.
  assert result['top1'] == pytest.approx(trained['test_accuracy'], abs=1e-6)
  assert result['top5'] == pytest.approx(trained['test_top5_accuracy'], abs=1e-6)
  assert 0 <= result['top1'] <= result['top5'] <= 1
  # The same through an .npz file, its data set and preprocessing given by flags.
  assert (
    evaluate.main(
      [
        f'--checkpoint={os.path.join(path, "params.npz")}',
        '--model=testing',
        '--dataset=digits',
        '--pp=decode|resize(16)|value_range(-1,1)|onehot',
        '--split=train[:100]',
        '--json',
      ]
    )
    == 0
  )
  result = json.loads(capsys.readouterr().out)
  assert result['examples'] == 100 and result['split'] == 'train[:100]'


@pytest.mark.parametrize(
  'name, overrides',
  [
    ('testing', {'representation_size': 8, 'classifier': 'gap'}),  # pre_logits, no cls token
    ('testing-mixer', {}),
  ],
)
def test_npz_of_other_heads_and_mixer(tmp_path, name, overrides):
  config = models.get_model_config(name, num_classes=4, **overrides)
  _, params = _random_params(config)
  path = str(tmp_path / 'm.npz')
  params_io.save_npz(params, path)
  clf = infer.load_classifier(path, name)  # Head width and pre_logits read from the file.
  assert clf.num_classes == 4
  assert clf.model_config.get('representation_size') == overrides.get('representation_size')
  if 'classifier' in overrides:  # Read from the file (no class token), not the registry entry.
    assert clf.model_config.classifier == overrides['classifier']
  img = _write_images(str(tmp_path), np.random.default_rng(0), [(32, 32)])
  (result,) = list(infer.classify_files(clf, img, top_k=2))
  assert len(result['predictions']) == 2


def test_max_image_pixels_refuses_large_files_by_name(npz_setup, capsys):
  good = npz_setup['good']  # The first is 60 x 40 = 2,400 pixels, the second 48 x 48 = 2,304.
  argv = [f'--checkpoint={npz_setup["npz"]}', '--model=testing', '--json', good[0], good[1]]
  assert infer.main([*argv, '--max_image_pixels=2350']) == 1
  out = capsys.readouterr()
  assert f'error: {good[0]}' in out.err and 'over the limit of 2350' in out.err
  assert good[1] not in out.err
  assert infer.main(argv) == 0  # The default limit (8000 x 8000) lets both through.
