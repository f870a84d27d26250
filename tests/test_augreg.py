"""AugReg file names (models.augreg), their model configs, and the checkpoint picker."""

import csv
import json

import pytest

from mixer_vit import models
from mixer_vit import pick_augreg
from mixer_vit.models import augreg

UP_B16 = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0'
UP_B16_I1K = 'B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1'
UP_B16_30 = 'B_16-i21k-30ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0'
UP_R26 = 'R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0'
# The released index.csv's columns, in its order.
COLUMNS = (
  'name,ds,epochs,lr,aug,wd,do,sd,best_val,final_val,final_test,adapt_ds,adapt_lr,adapt_steps,'
  'adapt_resolution,adapt_final_val,adapt_final_test,params,infer_samples_per_sec,filename,'
  'adapt_filename'
).split(',')
# (upstream file, ds, final_val, target, steps, lr, resolution, adapt_final_val, adapt_final_test)
ROWS = [
  (UP_B16, 'i21k', 0.47, 'imagenet2012', 20000, 0.03, 384, 0.862, 0.855),
  (UP_B16, 'i21k', 0.47, 'imagenet2012', 20000, 0.01, 384, 0.858, 0.853),
  (UP_B16, 'i21k', 0.47, 'imagenet2012', 20000, 0.03, 224, 0.848, 0.841),
  (UP_B16_I1K, 'i1k', 0.78, 'imagenet2012', 20000, 0.01, 384, 0.812, 0.806),
  (UP_B16_I1K, 'i1k', 0.78, 'imagenet2012', 20000, 0.01, 224, 0.795, 0.790),
  (UP_B16_30, 'i21k_30', 0.45, 'imagenet2012', 20000, 0.01, 384, 0.840, 0.835),
  (UP_B16, 'i21k', 0.47, 'oxford_iiit_pet', 500, 0.003, 384, 0.950, 0.945),
  (UP_R26, 'i21k', 0.44, 'imagenet2012', 20000, 0.01, 384, 0.845, 0.838),
  (UP_R26, 'i21k', 0.44, 'imagenet2012', 20000, 0.03, 224, 0.822, 0.815),
]


def _adapt_name(up, target, steps, lr, res):
  return f'{up}--{target}-steps_{steps // 1000}k-lr_{lr:g}-res_{res}'


def _write_index(path, rows=ROWS, columns=COLUMNS):
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    for up, ds, final_val, target, steps, lr, res, val, test in rows:
      info = augreg.parse(up)
      writer.writerow(
        {
          'name': info.paper_name,
          'ds': ds,
          'epochs': info.epochs,
          'lr': info.lr,
          'aug': info.aug,
          'wd': info.wd,
          'do': info.dropout,
          'sd': info.stochastic_depth,
          'best_val': final_val,
          'final_val': final_val,
          'final_test': final_val,
          'adapt_ds': target,
          'adapt_lr': lr,
          'adapt_steps': steps,
          'adapt_resolution': res,
          'adapt_final_val': val,
          'adapt_final_test': test,
          'params': 86_000_000,
          'infer_samples_per_sec': 100.0,
          'filename': up,
          'adapt_filename': _adapt_name(up, target, steps, lr, res),
        }
      )
  return str(path)


def test_every_file_name_of_the_index_parses_to_what_the_columns_say(tmp_path):
  with open(_write_index(tmp_path / 'index.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(ROWS)
  for row in rows:
    up, fine = augreg.parse(row['filename']), augreg.parse(row['adapt_filename'])
    assert not up.fine_tuned and fine.fine_tuned
    assert up.paper_name == fine.paper_name == row['name']
    assert fine.index_dataset == row['ds']
    assert (fine.aug, fine.wd, fine.dropout, fine.epochs) == (
      row['aug'],
      float(row['wd']),
      float(row['do']),
      int(row['epochs']),
    )
    assert fine.target_dataset == row['adapt_ds']
    assert fine.resolution == int(row['adapt_resolution'])
    assert fine.target_lr == float(row['adapt_lr'])
    assert fine.target_steps_k == int(row['adapt_steps']) // 1000
    assert fine.upstream == row['filename']


def test_a_fine_tuned_name_with_path_and_extension_parses():
  name = f'gs://vit_models/augreg/{UP_R26}--imagenet2012-steps_20k-lr_0.01-res_384.npz'
  info = augreg.parse(name)
  assert (info.prefix, info.model, info.paper_name) == ('R26_S_32', 'R26+ViT-S_32', 'R26+S/32')
  assert (info.pretrain_dataset, info.epochs, info.lr, info.aug) == ('i21k', 300, 0.001, 'light1')
  assert (info.wd, info.dropout, info.stochastic_depth) == (0.1, 0.0, 0.0)
  assert (info.target_dataset, info.target_steps_k, info.target_lr, info.resolution) == (
    'imagenet2012',
    20,
    0.01,
    384,
  )
  assert info.gs_path == augreg.strip(name).join(('gs://vit_models/augreg/', '.npz'))
  assert augreg.parse(f'R_Ti_16{UP_B16[4:]}').model == 'R+ViT-Ti_16'


@pytest.mark.parametrize(
  'name, message',
  [
    (f'X_16{UP_B16[4:]}', 'The release has the models Ti_16'),
    (UP_B16.replace('aug_medium1', 'augmedium1'), "augmentation (aug_<level>), got 'augmedium1'"),
    (UP_B16.replace('-sd_0.0', ''), 'expected 7'),
    (f'{UP_B16}--imagenet2012-steps_20k-res_384', 'expected 4'),
  ],
)
def test_bad_file_names_say_what_is_wrong(name, message):
  with pytest.raises(ValueError, match='AugReg') as e:
    augreg.parse(name)
  assert message in str(e.value)


def test_model_config_of_file_names():
  up = models.get_model_config(UP_B16 + '.npz')
  assert up.name == 'ViT-B_16'
  assert (up.num_classes, up.representation_size, up.image_size) == (21843, None, (224, 224))
  i1k = models.get_model_config(UP_B16_I1K)
  assert (i1k.num_classes, i1k.dropout_rate, i1k.stochastic_depth) == (1000, 0.0, 0.0)
  fine = models.get_model_config(f'{UP_R26}--oxford_iiit_pet-steps_0k-lr_0.003-res_384')
  assert fine.name == 'R26+ViT-S_32'
  assert (fine.num_classes, fine.image_size) == (37, (384, 384))
  # Explicit overrides win over the file's settings.
  mine = models.get_model_config(f'{UP_R26}--imagenet2012-steps_20k-lr_0.01-res_384', num_classes=5)
  assert (mine.num_classes, mine.image_size) == (5, (384, 384))


def test_short_paper_and_registry_names_still_resolve():
  assert models.resolve_name('R26_S_32') == 'R26+ViT-S_32'
  assert models.resolve_name('R+Ti/16') == 'R+ViT-Ti_16'
  assert models.resolve_name(UP_B16) == 'ViT-B_16'
  assert models.get_model_config('ViT-L_16').dropout_rate == 0.1  # Registry defaults unchanged.
  with pytest.raises(ValueError, match='AugReg file names'):
    models.resolve_name('B-16')


def test_the_recommendation_follows_the_index_numbers(tmp_path):
  index = _write_index(tmp_path / 'index.csv')
  best = pick_augreg.report(index, 'B/16', resolution=384)['recommended']
  assert best['file'] == _adapt_name(UP_B16, 'imagenet2012', 20000, 0.03, 384)
  assert pick_augreg.report(index, 'ViT-B_16', resolution=224)['recommended']['file'] == (
    _adapt_name(UP_B16, 'imagenet2012', 20000, 0.03, 224)
  )
  # Raise the i1k file's validation accuracy above the others: it becomes the choice.
  rows = [r if r[0] != UP_B16_I1K or r[6] != 384 else (*r[:7], 0.9, 0.7) for r in ROWS]
  index = _write_index(tmp_path / 'changed.csv', rows)
  best = pick_augreg.report(index, 'B_16', resolution=384)['recommended']
  assert best['file'] == _adapt_name(UP_B16_I1K, 'imagenet2012', 20000, 0.01, 384)
  best = pick_augreg.report(index, 'B/16', resolution=384, pretrain='i21k_30')['recommended']
  assert best['file'] == _adapt_name(UP_B16_30, 'imagenet2012', 20000, 0.01, 384)


def test_the_command_names_the_file_its_path_and_the_download(tmp_path, capsys):
  index = _write_index(tmp_path / 'index.csv')
  assert pick_augreg.main([f'--index={index}', '--model=R26+S/32', '--resolution=384']) == 0
  out = capsys.readouterr().out
  name = _adapt_name(UP_R26, 'imagenet2012', 20000, 0.01, 384)
  assert f'Recommended: {name}' in out
  assert f'gsutil cp gs://vit_models/augreg/{name}.npz .' in out
  assert f'https://storage.googleapis.com/vit_models/augreg/{name}.npz' in out
  assert pick_augreg.main([f'--index={index}', '--model=B/16', '--json']) == 0
  r = json.loads(capsys.readouterr().out)
  assert r['matches'] == 6 and [f['val'] for f in r['files']][:2] == [0.862, 0.858]
  assert r['recommended_pretrained']['file'] == UP_B16


def test_the_command_names_a_missing_file_column_or_match(tmp_path, capsys):
  assert pick_augreg.main([f'--index={tmp_path}/none.csv', '--model=B/16']) == 2
  assert 'none.csv not found' in capsys.readouterr().err
  index = _write_index(tmp_path / 'index.csv', columns=[c for c in COLUMNS if c != 'final_val'])
  assert pick_augreg.main([f'--index={index}', '--model=B/16']) == 2
  assert 'lacks the column(s) final_val' in capsys.readouterr().err
  index = _write_index(tmp_path / 'ok.csv')
  assert pick_augreg.main([f'--index={index}', '--model=L/16']) == 2
  assert 'No file of L/16' in capsys.readouterr().err
  assert pick_augreg.main([f'--index={index}', '--model=B/16', '--resolution=512']) == 2
  assert 'resolutions 224, 384' in capsys.readouterr().err
  with open(index, 'a') as f:
    f.write(','.join(['B/16', 'i21k'] + ['0.5'] * (len(COLUMNS) - 3) + ['B_16-oops']) + '\n')
  assert pick_augreg.main([f'--index={index}', '--model=B/16']) == 0
  assert 'skipped 1 row(s)' in capsys.readouterr().err
