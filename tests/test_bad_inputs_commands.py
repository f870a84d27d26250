"""Bad inputs to the checkpoint commands (infer, evaluate, export, attention, plot, pick_augreg).

Each case runs a command's ``main(argv)`` in-process and checks the exit status, that the command
said ONE line naming the culprit, that every file of the user's is byte-identical afterwards
(nothing added, nothing changed), and, for the refusals, that JAX compiled nothing first.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from mixer_vit import attention
from mixer_vit import cli
from mixer_vit import evaluate
from mixer_vit import export
from mixer_vit import infer
from mixer_vit import models
from mixer_vit import pick_augreg
from mixer_vit import plot
from mixer_vit.models import params_io

import param_trees

COMMANDS = {
  'infer': infer.main,
  'evaluate': evaluate.main,
  'export': export.main,
  'attention': attention.main,
  'plot': plot.main,
  'pick_augreg': pick_augreg.main,
}

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
  lambda event, *_, **__: _COMPILES.append(event) if 'backend_compile' in event else None
)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Shared read-only inputs: tiny .npz files, a tiny trained workdir, images, odd files."""
  root = tmp_path_factory.mktemp('inputs')
  # A ViT trained at 48x48 (12x12 tokens of 4x4 pixels) with 7 classes, and a Mixer.
  vit = models.get_model_config('testing', num_classes=7, image_size=(48, 48))
  params_io.save_npz(param_trees.random_params(vit), str(root / 'vit.npz'))
  mixer = models.get_model_config('testing-mixer', num_classes=4)
  params_io.save_npz(param_trees.random_params(mixer), str(root / 'mixer.npz'))
  (root / 'labels7.txt').write_text(''.join(f'class {i}\n' for i in range(7)))
  (root / 'labels3.txt').write_text('a\nb\nc\n')
  rng = np.random.default_rng(0)
  (root / 'images' / 'sub').mkdir(parents=True)
  for name, (h, w) in (('cat.png', (48, 48)), ('dog.jpg', (40, 60)), ('sub/cat.jpg', (32, 32))):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / 'images' / name)
  (root / 'images' / 'broken.jpg').write_bytes(b'this is not a jpeg')
  (root / 'noimages').mkdir()
  (root / 'noimages' / 'notes.txt').write_text('no pictures here')
  (root / 'blob.bin').write_bytes(b'\x89\x00\xff\xfe' + rng.bytes(200))
  (root / 'notes.npz').write_text('these are my notes, not parameters')
  workdir, _ = param_trees.train_tiny_digits(root / 'run')
  return {
    'npz': str(root / 'vit.npz'),
    'mixer': str(root / 'mixer.npz'),
    'labels7': str(root / 'labels7.txt'),
    'labels3': str(root / 'labels3.txt'),
    'cat': str(root / 'images' / 'cat.png'),
    'dog': str(root / 'images' / 'dog.jpg'),
    'subcat': str(root / 'images' / 'sub' / 'cat.jpg'),
    'broken': str(root / 'images' / 'broken.jpg'),
    'noimages': str(root / 'noimages'),
    'blob': str(root / 'blob.bin'),
    'textnpz': str(root / 'notes.npz'),
    'workdir': workdir,
  }


def _jpeg(seed: int) -> bytes:
  buffer = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(buffer, format='JPEG')
  return buffer.getvalue()


@pytest.fixture
def user(tmp_path):
  """A folder of the user's own files, made fresh for each case: ``{'u': its path}``."""
  u = tmp_path / 'user'
  (u / 'mine').mkdir(parents=True)
  (u / 'mine' / 'mine.txt').write_text('a user file')
  (u / 'mycat.jpg').write_bytes(_jpeg(1))
  (u / 'notes.onnx').write_text('my notes about ONNX, not a model')
  (u / 'precious.txt').write_text('precious')
  (u / 'foreign_sm' / 'variables').mkdir(parents=True)  # Someone else's SavedModel.
  (u / 'foreign_sm' / 'saved_model.pb').write_bytes(b'\x08\x01 not ours')
  (u / 'maps').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(u / 'maps' / 'cat_rollout.png')
  return {'u': str(u)}


def _snapshot(folder: str) -> dict[str, bytes | None]:
  """Every file (bytes) and folder (None) below ``folder``."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), folder)] = None
    for f in files:
      with open(os.path.join(root, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
  return out


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  command: str
  argv: tuple[str, ...]  # Templates: {npz}, {workdir}, {u} (the user's folder), ... (see env).
  rc: int
  says: tuple[str, ...]  # Fragments the one error line holds (templates too).
  compiles: bool = False  # Whether the command may compile (it classifies images).


def _case(id, command, argv, says, rc=2, compiles=False):
  return Case(id, command, tuple(argv), rc, tuple(says), compiles)


NPZ = ('--checkpoint={npz}', '--model=testing')
CASES = [
  # --- infer: checkpoints.
  _case(
    'infer-missing-npz',
    'infer',
    ['--checkpoint={u}/nope.npz', '--model=testing', '{cat}'],
    ['nope.npz', 'not found'],
  ),
  _case(
    'infer-user-folder', 'infer', ['--checkpoint={u}/mine', '{cat}'], ['{u}/mine', 'config.json']
  ),
  _case(
    'infer-text-as-npz',
    'infer',
    ['--checkpoint={textnpz}', '--model=testing', '{cat}'],
    ['notes.npz', 'not a readable .npz'],
  ),
  _case(
    'infer-npz-without-model', 'infer', ['--checkpoint={npz}', '{cat}'], ['--model is required']
  ),
  _case(
    'infer-unknown-model',
    'infer',
    ['--checkpoint={npz}', '--model=NoSuchNet', '{cat}'],
    ['NoSuchNet', 'Known models'],
  ),
  _case(
    'infer-npz-of-another-model',
    'infer',
    ['--checkpoint={npz}', '--model=testing-mixer', '{cat}'],
    ['vit.npz', 'does not fit --model=testing-mixer', 'missing keys (e.g. '],
  ),
  _case(
    'infer-workdir-other-model',
    'infer',
    ['--checkpoint={workdir}', '--model=testing-mixer', '{cat}'],
    ['--model=testing-mixer', 'leave --model out'],
  ),
  # --- infer: labels.
  _case(
    'infer-npz-labels-too-few',
    'infer',
    [*NPZ, '--labels={labels3}', '{cat}'],
    ['labels3.txt', '3 names', '7 classes'],
  ),
  _case(
    'infer-workdir-labels-too-few',
    'infer',
    ['--checkpoint={workdir}', '--labels={labels3}', '{cat}'],
    ['labels3.txt', '3 names', '10 classes'],
  ),
  _case(
    'infer-labels-binary', 'infer', [*NPZ, '--labels={blob}', '{cat}'], ['blob.bin', 'not UTF-8']
  ),
  _case('infer-labels-missing', 'infer', [*NPZ, '--labels={u}/names.txt', '{cat}'], ['names.txt']),
  _case('infer-labels-folder', 'infer', [*NPZ, '--labels={u}/mine', '{cat}'], ['{u}/mine']),
  # --- infer: sizes.
  _case('infer-resolution-0', 'infer', [*NPZ, '--resolution=0', '{cat}'], ['--resolution']),
  _case(
    'infer-resolution-text', 'infer', [*NPZ, '--resolution=big', '{cat}'], ['--resolution', 'big']
  ),
  _case(
    'infer-resolution-7-npz',
    'infer',
    [*NPZ, '--resolution=7', '{cat}'],
    ['--resolution=7,7', '4x4-pixel tokens'],
  ),
  _case(
    'infer-resolution-mixer',
    'infer',
    ['--checkpoint={mixer}', '--model=testing-mixer', '--resolution=64', '{cat}'],
    ['--resolution=64,64', 'only at the resolution it was made for, 32x32'],
  ),
  _case(
    'infer-resolution-workdir',
    'infer',
    ['--checkpoint={workdir}', '--resolution=64', '{cat}'],
    ['--resolution', "workdir's training resolution"],
  ),
  _case('infer-top_k-0', 'infer', [*NPZ, '--top_k=0', '{cat}'], ['--top_k', 'at least 1']),
  _case('infer-top_k-negative', 'infer', [*NPZ, '--top_k=-3', '{cat}'], ['--top_k']),
  _case('infer-batch_size-0', 'infer', [*NPZ, '--batch_size=0', '{cat}'], ['--batch_size']),
  _case(
    'infer-max_pixels-negative',
    'infer',
    [*NPZ, '--max_image_pixels=-1', '{cat}'],
    ['--max_image_pixels'],
  ),
  # --- infer: images.
  _case('infer-no-images', 'infer', [*NPZ, '{noimages}'], ['no image files', 'noimages']),
  _case(
    'infer-broken-among-good',
    'infer',
    [*NPZ, '{cat}', '{broken}', '{dog}'],
    ['broken.jpg'],
    rc=1,
    compiles=True,
  ),
  _case(
    'infer-missing-among-good',
    'infer',
    [*NPZ, '{cat}', '{u}/gone.jpg'],
    ['gone.jpg'],
    rc=1,
    compiles=True,
  ),
  _case(
    'infer-pixel-limit',
    'infer',
    [*NPZ, '--max_image_pixels=100', '{cat}'],
    ['cat.png', 'over the limit of 100', '--max_image_pixels=N'],
    rc=1,
  ),
  # --- export: the user's files are never replaced.
  _case(
    'export-onnx-over-user-notes',
    'export',
    [*NPZ, '--format=onnx', '--out={u}/notes.onnx', '--overwrite'],
    ['--out={u}/notes.onnx', 'not written by mixer_vit'],
  ),
  _case(
    'export-onnx-over-user-text',
    'export',
    [*NPZ, '--format=onnx', '--out={u}/precious.txt', '--overwrite'],
    ['precious.txt', 'not written by mixer_vit'],
  ),
  _case(
    'export-onnx-over-user-text-no-flag',
    'export',
    [*NPZ, '--format=onnx', '--out={u}/precious.txt'],
    ['precious.txt', 'never replaced'],
  ),
  _case(
    'export-saved-model-over-user-folder',
    'export',
    [*NPZ, '--format=saved_model', '--out={u}/mine', '--overwrite'],
    ['{u}/mine', 'not written by mixer_vit'],
  ),
  _case(
    'export-saved-model-over-foreign-saved-model',
    'export',
    [*NPZ, '--format=saved_model', '--out={u}/foreign_sm', '--overwrite'],
    ['foreign_sm', 'not written by mixer_vit'],
  ),
  _case(
    'export-onnx-out-is-folder',
    'export',
    [*NPZ, '--format=onnx', '--out={u}/mine', '--overwrite'],
    ['{u}/mine', 'is a folder'],
  ),
  _case(
    'export-missing-parent',
    'export',
    [*NPZ, '--format=onnx', '--out={u}/no/such/m.onnx'],
    ['{u}/no/such', 'does not exist'],
  ),
  _case(
    'export-top_k-0',
    'export',
    [*NPZ, '--format=saved_model', '--out={u}/sm', '--top_k=0'],
    ['--top_k'],
  ),
  _case(
    'export-bad-platform',
    'export',
    [*NPZ, '--format=saved_model', '--out={u}/sm', '--platforms=gpu'],
    ['--platforms=gpu'],
  ),
  _case(
    'export-missing-checkpoint',
    'export',
    ['--checkpoint={u}/nope.npz', '--model=testing', '--format=saved_model', '--out={u}/sm'],
    ['nope.npz', 'not found'],
  ),
  _case(
    'export-unknown-format',
    'export',
    [*NPZ, '--format=tflite', '--out={u}/m'],
    ['--format', 'tflite'],
  ),
  # --- plot.
  _case(
    'plot-over-a-photo',
    'plot',
    ['--workdir={workdir}', '--out={u}/mycat.jpg'],
    ['mycat.jpg', 'not written by mixer_vit'],
  ),
  _case(
    'plot-over-a-photo-overwrite',
    'plot',
    ['--workdir={workdir}', '--out={u}/mycat.jpg', '--overwrite'],
    ['mycat.jpg', 'not written by mixer_vit'],
  ),
  _case(
    'plot-out-is-a-folder',
    'plot',
    ['--workdir={workdir}', '--out={u}/mine'],
    ['--out={u}/mine', 'is a folder'],
  ),
  _case(
    'plot-out-inside-a-file',
    'plot',
    ['--workdir={workdir}', '--out={u}/precious.txt/c.png'],
    ['precious.txt', 'is a file'],
  ),
  _case(
    'plot-no-metrics',
    'plot',
    ['--workdir={u}/mine', '--out={u}/new.png'],
    ['{u}/mine', 'metrics.jsonl'],
  ),
  _case(
    'plot-label-count',
    'plot',
    ['--workdir={workdir}', '--label=a', '--label=b', '--out={u}/new.png'],
    ['--label'],
  ),
  # --- attention.
  _case(
    'attention-user-picture-in-out_dir',
    'attention',
    [*NPZ, '--out_dir={u}/maps', '--overwrite', '{cat}'],
    ['cat_rollout.png', 'not written by mixer_vit'],
  ),
  _case(
    'attention-out_dir-is-a-file',
    'attention',
    [*NPZ, '--out_dir={u}/precious.txt', '{cat}'],
    ['--out_dir={u}/precious.txt', 'is a file'],
  ),
  _case(
    'attention-summary-over-a-photo',
    'attention',
    [*NPZ, '--out_dir={u}/new', '--summary={u}/mycat.jpg', '{cat}'],
    ['--summary={u}/mycat.jpg', 'not written by mixer_vit'],
  ),
  _case(
    'attention-two-images-one-name',
    'attention',
    [*NPZ, '--out_dir={u}/new', '{cat}', '{subcat}'],
    ['cat.png', 'cat.jpg', 'would both write'],
  ),
  _case(
    'attention-mixer',
    'attention',
    ['--checkpoint={mixer}', '--model=testing-mixer', '--out_dir={u}/new', '{cat}'],
    ['MLP-Mixer', 'no attention'],
  ),
  _case(
    'attention-layer-out-of-range',
    'attention',
    [*NPZ, '--layer=5', '{cat}'],
    ['--layer=5', '2 layers'],
  ),
  _case('attention-min_side-0', 'attention', [*NPZ, '--min_side=0', '{cat}'], ['--min_side']),
  _case(
    'attention-no-images',
    'attention',
    [*NPZ, '--out_dir={u}/new', '{noimages}'],
    ['no image files'],
  ),
  # --- evaluate.
  _case('evaluate-npz-without-dataset', 'evaluate', [*NPZ], ['--dataset is required']),
  _case(
    'evaluate-batch_size-0',
    'evaluate',
    ['--checkpoint={workdir}', '--batch_size=0'],
    ['--batch_size'],
  ),
  _case(
    'evaluate-fewshot-flag-alone',
    'evaluate',
    ['--checkpoint={workdir}', '--shots=1,5'],
    ['--shots', 'only with --fewshot'],
  ),
  _case(
    'evaluate-missing-checkpoint', 'evaluate', ['--checkpoint={u}/run'], ['{u}/run', 'not found']
  ),
  _case('evaluate-resolution-negative', 'evaluate', [*NPZ, '--resolution=-5'], ['--resolution']),
  # --- pick_augreg (the AugReg index).
  _case(
    'pick_augreg-binary-index',
    'pick_augreg',
    ['--index={blob}', '--model=B/16'],
    ['--index=', 'blob.bin', 'not a CSV'],
  ),
  _case(
    'pick_augreg-missing-index',
    'pick_augreg',
    ['--index={u}/index.csv', '--model=B/16'],
    ['index.csv', 'not found'],
  ),
  _case(
    'pick_augreg-folder-index', 'pick_augreg', ['--index={u}/mine', '--model=B/16'], ['{u}/mine']
  ),
]


def _run(command: str, argv: list[str]) -> int:
  try:
    return COMMANDS[command](argv)
  except SystemExit as e:  # argparse
    return e.code


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env, user, capsys):
  names = {**env, **user}
  argv = [a.format(**names) for a in case.argv]
  before = _snapshot(user['u'])
  capsys.readouterr()
  compiles = len(_COMPILES)
  rc = _run(case.command, argv)
  out, err = capsys.readouterr()
  assert rc == case.rc, (out, err)
  lines = [line for line in err.splitlines() if line.strip()]
  if case.rc == 2:  # Refused: one line, nothing else.
    assert len(lines) == 1, err
  errors = [line for line in lines if line.startswith('error: ')]
  assert len(errors) == 1, err
  for fragment in case.says:
    assert fragment.format(**names) in errors[0], errors[0]
  assert '--config.' not in errors[0]  # These commands take no --config flags.
  assert _snapshot(user['u']) == before  # The user's files: not one byte changed, none added.
  if not case.compiles:
    assert len(_COMPILES) == compiles, 'compiled before refusing'


def test_the_table_holds_enough_cases():
  assert len(CASES) >= 35
  assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------------------------
# What is allowed: our own earlier output with --overwrite, and --resolution honoured.


def test_plot_replaces_only_its_own_plot_and_only_with_overwrite(env, user, capsys):
  out = os.path.join(user['u'], 'curves.png')
  argv = [f'--workdir={env["workdir"]}', f'--out={out}']
  assert plot.main(argv) == 0
  assert cli.png_is_ours(out) and not cli.png_is_ours(os.path.join(user['u'], 'mycat.jpg'))
  first = open(out, 'rb').read()
  capsys.readouterr()
  assert plot.main(argv) == 2
  assert 'pass --overwrite' in capsys.readouterr().err
  assert open(out, 'rb').read() == first
  os.utime(out, (1, 1))
  assert plot.main([*argv, '--overwrite']) == 0
  assert os.path.getmtime(out) > 1 and cli.png_is_ours(out)
  assert sorted(os.listdir(user['u'])) == sorted(
    ['curves.png', 'foreign_sm', 'maps', 'mine', 'mycat.jpg', 'notes.onnx', 'precious.txt']
  )  # No staging folder left behind.


def test_attention_pictures_are_marked_as_ours(tmp_path):
  picture = np.zeros((16, 16, 3), np.uint8)
  path = attention.save_overlay_png(str(tmp_path / 'a.png'), picture, np.ones((4, 4)))
  assert cli.png_is_ours(path)
  cli.check_output(path, '--out_dir', overwrite=True, ours=cli.png_is_ours)  # Replaceable.
  with pytest.raises(cli.CommandError, match='pass --overwrite'):
    cli.check_output(path, '--out_dir', overwrite=False, ours=cli.png_is_ours)
  Image.fromarray(picture).save(tmp_path / 'plain.png')  # A PNG without our text chunk.
  assert not cli.png_is_ours(str(tmp_path / 'plain.png'))


def test_saved_model_is_ours_only_with_our_facts_file(tmp_path):
  folder = tmp_path / 'sm'
  (folder / 'assets.extra').mkdir(parents=True)
  (folder / 'saved_model.pb').write_bytes(b'\x08\x01')
  assert not export.saved_model_is_ours(str(folder))
  (folder / export.INFO_FILE).write_text(json.dumps({'software': cli.SOFTWARE}))
  assert export.saved_model_is_ours(str(folder))
  (folder / export.INFO_FILE).write_text('{broken')
  assert not export.saved_model_is_ours(str(folder))


@pytest.mark.skipif(not importlib.util.find_spec('onnx'), reason='onnx not installed')
def test_onnx_metadata_is_read_without_onnx_and_tells_ours(tmp_path):
  import onnx  # noqa: PLC0415
  from onnx import helper  # noqa: PLC0415

  node = helper.make_node('Identity', ['x'], ['y'])
  graph = helper.make_graph(
    [node],
    'g',
    [helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, [1])],
  )
  model = helper.make_model(graph, producer_name='someone')
  onnx.save_model(model, str(tmp_path / 'theirs.onnx'))
  assert export.onnx_metadata(str(tmp_path / 'theirs.onnx')) == {}
  assert not export.onnx_is_ours(str(tmp_path / 'theirs.onnx'))
  helper.set_model_props(model, {'software': cli.SOFTWARE, 'format': 'onnx'})
  onnx.save_model(model, str(tmp_path / 'ours.onnx'))
  assert export.onnx_metadata(str(tmp_path / 'ours.onnx')) == {
    'software': cli.SOFTWARE,
    'format': 'onnx',
  }
  assert export.onnx_is_ours(str(tmp_path / 'ours.onnx'))
  (tmp_path / 'text.onnx').write_text('ir_version: 8, not a protobuf')
  assert export.onnx_metadata(str(tmp_path / 'text.onnx')) is None


def test_resolution_on_a_vit_npz_is_honoured(env, capsys):
  native = infer.load_classifier(env['npz'], 'testing')
  wide = infer.load_classifier(env['npz'], 'testing', resolution=(64, 64))
  assert native.image_size == (48, 48) and wide.image_size == (64, 64)
  assert wide.pp == 'decode|resize((64, 64))|value_range(-1, 1)'
  posemb = wide.params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape[1] == 1 + 16 * 16  # Resized from 12x12 to 16x16 tokens.
  argv = ['--checkpoint=' + env['npz'], '--model=testing', '--top_k=7', '--json', env['cat']]
  results = []
  for extra in ([], ['--resolution=64']):
    assert infer.main([*argv, *extra]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    results.append({p['label']: p['probability'] for p in json.loads(line)['predictions']})
  # The same picture at another resolution through resized embeddings: other probabilities.
  assert results[0].keys() == results[1].keys() == set(range(7))
  assert max(abs(results[0][k] - results[1][k]) for k in range(7)) > 1e-4
