"""Executes the notebooks in colabs/ top to bottom, offline, with this interpreter as the kernel."""

import json
import pathlib
import sys
import time

from nbclient import NotebookClient
import nbformat
import pytest

COLABS = pathlib.Path(__file__).resolve().parents[1] / 'colabs'
NOTEBOOKS = sorted(COLABS.glob('*.ipynb'))
KERNEL_NAME = 'mixer-vit-test'
TIME_BUDGET_S = 240  # Per notebook; each takes well under 90 s on an idle 2-core machine.


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
  assert {'explore_models.ipynb', 'finetune.ipynb'} <= names


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_stale_outputs(path):
  nb = nbformat.read(str(path), as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      errors = [o for o in cell.get('outputs', []) if o.get('output_type') == 'error']
      assert not errors, f'{path.name} is committed with an error output; clear its outputs'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel_dir, monkeypatch, tmp_path):
  monkeypatch.setenv('JUPYTER_PATH', str(kernel_dir))
  # The kernel's own inline backend draws figures into the outputs (Agg would draw nothing).
  monkeypatch.delenv('MPLBACKEND', raising=False)
  # One CPU device in the kernel: the notebooks are timed like a laptop run, not 8 fake devices.
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  for name in (
    'MIXER_VIT_CHECKPOINT',
    'MIXER_VIT_MODEL',
    'MIXER_VIT_LABELS',
    'MIXER_VIT_IMAGE',
    'MIXER_VIT_DATASET',
    'MIXER_VIT_WORKDIR',
    'MIXER_VIT_RESOLUTION',
    'MIXER_VIT_PRETRAINED',
    'MIXER_VIT_STEPS',
  ):
    monkeypatch.delenv(name, raising=False)
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
