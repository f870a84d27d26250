"""Executes the notebooks in colabs/ top to bottom, offline, with this interpreter as the kernel."""

import json
import math
import pathlib
import sys
import time

from nbclient import NotebookClient
import nbformat
import numpy as np
import pytest
import test_analysis

from mixer_vit.analysis import ANALYSES
from mixer_vit.analysis import common

COLABS = pathlib.Path(__file__).resolve().parents[1] / 'colabs'
NOTEBOOKS = sorted(COLABS.glob('*.ipynb'))
KERNEL_NAME = 'mixer-vit-test'
TIME_BUDGET_S = 240  # Per notebook; each takes well under 90 s on an idle 2-core machine.
# Parameters of the notebooks, from the environment: cleared before each run.
PARAMETERS = (
  'MIXER_VIT_CHECKPOINT',
  'MIXER_VIT_MODEL',
  'MIXER_VIT_LABELS',
  'MIXER_VIT_IMAGE',
  'MIXER_VIT_DATASET',
  'MIXER_VIT_WORKDIR',
  'MIXER_VIT_RESOLUTION',
  'MIXER_VIT_PRETRAINED',
  'MIXER_VIT_STEPS',
  'MIXER_VIT_PP',
  'MIXER_VIT_EXAMPLES',
  'MIXER_VIT_BATCH_SIZE',
  'MIXER_VIT_BATCHES',
  'MIXER_VIT_ITERATIONS',
  'MIXER_VIT_LANCZOS',
  'MIXER_VIT_LANDSCAPE_STEPS',
  'MIXER_VIT_OUT',
)
# Notebooks that need a checkpoint: run by their own test, with one made for them.
NEED_A_CHECKPOINT = ('how_do_vits_work.ipynb',)
# The fixture: a tiny ViT trained for a few steps on the 8x8 digits (a 2x2 token grid).
digits_workdir = test_analysis.digits_workdir


@pytest.fixture(scope='module')
def kernel_dir(tmp_path_factory):
  """A kernelspec that runs ipykernel with the interpreter running the tests (the venv)."""
  root = tmp_path_factory.mktemp('jupyter')
  spec = root / 'kernels' / KERNEL_NAME
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(
    json.dumps(
      {
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': 'mixer_vit test kernel',
        'language': 'python',
      }
    )
  )
  return root


def test_there_are_notebooks():
  names = {p.name for p in NOTEBOOKS}
  assert {'explore_models.ipynb', 'finetune.ipynb', 'how_do_vits_work.ipynb'} <= names


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_stale_outputs(path):
  nb = nbformat.read(str(path), as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      errors = [o for o in cell.get('outputs', []) if o.get('output_type') == 'error']
      assert not errors, f'{path.name} is committed with an error output; clear its outputs'


def execute(path, kernel_dir, monkeypatch, tmp_path, **parameters):
  """Runs the notebook at `path` top to bottom with `parameters` as its environment variables;
  fails on any cell error, when it runs past the time budget or draws no figure. Returns it,
  executed (also written to `tmp_path` for inspection)."""
  monkeypatch.setenv('JUPYTER_PATH', str(kernel_dir))
  # The kernel's own inline backend draws figures into the outputs (Agg would draw nothing).
  monkeypatch.delenv('MPLBACKEND', raising=False)
  # One CPU device in the kernel: the notebooks are timed like a laptop run, not 8 fake devices.
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  for name in PARAMETERS:
    monkeypatch.delenv(name, raising=False)
  for name, value in parameters.items():
    monkeypatch.setenv(name, str(value))
  nb = nbformat.read(str(path), as_version=4)
  client = NotebookClient(
    nb,
    kernel_name=KERNEL_NAME,
    timeout=TIME_BUDGET_S,
    resources={'metadata': {'path': str(COLABS)}},
  )
  start = time.monotonic()
  try:
    client.execute()  # Raises CellExecutionError naming the cell and its traceback.
  finally:
    nbformat.write(nb, str(tmp_path / path.name))  # The executed copy, for inspection.
  elapsed = time.monotonic() - start
  assert elapsed < TIME_BUDGET_S, f'{path.name} took {elapsed:.0f} s'
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert any(
    o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {}) for o in outputs
  ), f'{path.name} drew no figure'
  return nb


@pytest.mark.parametrize(
  'path', [p for p in NOTEBOOKS if p.name not in NEED_A_CHECKPOINT], ids=lambda p: p.stem
)
def test_notebook_runs_top_to_bottom(path, kernel_dir, monkeypatch, tmp_path):
  execute(path, kernel_dir, monkeypatch, tmp_path)


def test_how_do_vits_work_runs_every_analysis_on_a_workdir(
  digits_workdir, kernel_dir, monkeypatch, tmp_path
):
  out = tmp_path / 'analyses'
  nb = execute(
    COLABS / 'how_do_vits_work.ipynb',
    kernel_dir,
    monkeypatch,
    tmp_path,
    MIXER_VIT_CHECKPOINT=digits_workdir,
    MIXER_VIT_EXAMPLES=32,
    MIXER_VIT_BATCH_SIZE=16,
    MIXER_VIT_BATCHES=3,
    MIXER_VIT_ITERATIONS=20,
    MIXER_VIT_LANCZOS=4,
    MIXER_VIT_LANDSCAPE_STEPS=5,
    MIXER_VIT_OUT=out,
  )
  pictures = [
    o
    for c in nb.cells
    if c.cell_type == 'code'
    for o in c.outputs
    if o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
  ]
  assert len(pictures) == len(ANALYSES)  # One picture per analysis, each shown once.
  results = {}
  for name in ANALYSES:
    assert (out / f'{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    results[name] = json.loads((out / f'{name}.json').read_text())
    assert results[name]['analysis'] == name and results[name]['checkpoint'] == digits_workdir
  kinds = ['input', 'attention', 'mlp']
  assert [b['kind'] for b in results['fourier']['blocks']] == kinds
  assert set(results['fourier']['mean_change_by_kind']) == {'attention', 'mlp'}
  assert [b['kind'] for b in results['variance']['blocks']] == kinds
  assert all(b['variance'] > 0 for b in results['variance']['blocks'])
  assert 0 < results['noise']['clean_accuracy'] <= 1 and results['noise']['examples'] == 32
  assert any(b['drop'] is not None for b in results['noise']['bands'])
  hessian = results['hessian']
  assert len(hessian['batches']) == 3 and hessian['split'] == 'train'
  assert all(math.isfinite(b['top']) and len(b['lanczos']) == 4 for b in hessian['batches'])
  assert hessian['top_max'] > 0
  # The landscape's centre is the model's own loss on its train examples (the first 32 of the 48
  # loaded for the Hessian), computed here apart.
  subject = common.load_subject(digits_workdir, examples=32, training_data=True)
  logits = subject.model.apply({'params': subject.params}, subject.images, train=False)
  loss = float(np.mean(common.cross_entropy(logits, subject.labels)))
  landscape = results['landscape']
  assert landscape['examples'] == 32 and np.shape(landscape['loss']) == (5, 5)
  assert landscape['loss'][2][2] == pytest.approx(loss, rel=1e-5)
  assert landscape['loss'][0][0] != pytest.approx(loss, rel=1e-3)
  # The last cell's summary names every claim's number.
  summary = ''.join(o.get('text', '') for o in nb.cells[-1].outputs)
  for claim in (
    '1. median largest Hessian eigenvalue',
    '2. change',
    '3. accuracy drop',
    '4. output',
  ):
    assert claim in summary
