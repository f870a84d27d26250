"""The curves command: a PNG from metrics.jsonl, and a clear error without one."""

import json
import math

import pytest

from mixer_vit import plot
from mixer_vit import workdir as workdir_lib

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _write_run(folder, ema):
  folder.mkdir()
  rows = []
  for step in range(10, 101, 10):
    rows.append({'step': step, 'loss': 2.3 * math.exp(-step / 50), 'lr': 1e-3 * (1 - step / 100)})
    if step % 50 == 0:
      row = {'step': step, 'test_accuracy': step / 110, 'test_loss': 1.0, 'test_examples': 299}
      if ema:
        row['test_accuracy_ema'] = step / 105
      rows.append(row)
  rows.append({'step': 100, 'fewshot/digits_5shot': 0.7})  # Other rows are ignored.
  (folder / workdir_lib.METRICS_FILE).write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(folder)


def test_curves_png_from_metrics_of_one_and_two_runs(tmp_path, capsys):
  a, b = _write_run(tmp_path / 'a', ema=True), _write_run(tmp_path / 'b', ema=False)
  assert plot.series(plot.read_metrics(a), 'test_accuracy_ema')[0] == [50, 100]
  for args, name in (
    ([f'--workdir={a}'], 'one.png'),
    ([f'--workdir={a}', f'--workdir={b}'], 'x/two.png'),
  ):
    out = tmp_path / name
    assert plot.main([*args, f'--out={out}']) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_missing_metrics_and_bad_labels_fail_clearly(tmp_path, capsys):
  missing = tmp_path / 'nothing'
  missing.mkdir()
  with pytest.raises(FileNotFoundError, match=f'{missing}/{workdir_lib.METRICS_FILE} not found'):
    plot.plot([str(missing)], str(tmp_path / 'x.png'))
  assert plot.main([f'--workdir={missing}', f'--out={tmp_path / "x.png"}']) == 2
  assert f'{workdir_lib.METRICS_FILE} not found' in capsys.readouterr().err
  assert not (tmp_path / 'x.png').exists()
  run = _write_run(tmp_path / 'a', ema=False)
  with pytest.raises(ValueError, match='one per workdir'):
    plot.plot([run], str(tmp_path / 'y.png'), labels=['a', 'b'])
