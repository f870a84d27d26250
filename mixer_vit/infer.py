r"""Classifies image files with a trained ViT or Mixer: top-k classes with names and probabilities.

  python -m mixer_vit.infer --checkpoint=WORKDIR IMAGE_OR_FOLDER...
  python -m mixer_vit.infer --model=ViT-B_16 --checkpoint=ViT-B_16.npz \
      --labels=ilsvrc2012_wordnet_lemmas.txt [--top_k=5] [--json] IMAGE_OR_FOLDER...

The preprocessing is the evaluation preprocessing the checkpoint expects:
- a training workdir (``python -m mixer_vit.main --workdir=...``): its ``pp_test`` (label ops
  dropped; a resize to the training resolution added when the string has none), its class names,
  and its model and latest parameters (``workdir.load_workdir``);
- an ``.npz`` file: ``decode|resize(H, W)|value_range(-1, 1)`` where (H, W) is the resolution the
  checkpoint was trained at, read from its position embeddings (``--resolution=H,W`` gives it for
  non-square checkpoints; another resolution runs a ViT with its position embeddings resized
  bilinearly and is refused for a Mixer, whose token mixing fixes the grid); class names from
  ``--labels`` (one per line, in label order, one per class).

``--ema`` takes the exponential moving average of the parameters of a run trained with
``config.ema_decay``: a workdir's checkpoint's EMA parameters, or the ``params_ema.npz`` beside a
workdir's ``params.npz`` (an error names what is missing when the run kept no EMA).

A Dynamic ViT cascade (family ``dvt``) answers each image at the first stage whose top probability
exceeds ``--thresholds`` (one value for every stage, or one per stage but the last; default 0.9)
and the output names that stage (``exit_stage``); other models refuse ``--thresholds``.

Folders are searched recursively for image files and processed in batches. A file that cannot be
read or decoded is reported by name on stderr and the others are still classified; the exit status
is then 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import json
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit import cli
from mixer_vit import models
from mixer_vit import workdir as workdir_lib
from mixer_vit.data import preprocess
from mixer_vit.models import dvt_adaptive
from mixer_vit.models import params_io
from mixer_vit.models import registry
from mixer_vit.runtime import paths
from mixer_vit.runtime import sizes
from mixer_vit.training import steps

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
# Ops that only concern labels; inference has none.
_LABEL_OPS = ('onehot', 'keep')
# Ops that fix the output resolution; without one a resize to the model's resolution is added.
_SIZE_OPS = ('resize', 'central_crop', 'random_crop', 'inception_crop')


@dataclasses.dataclass
class Classifier:
  """A model with its parameters and the preprocessing and class names that go with them."""

  model_config: Any
  model: Any  # flax module
  params: Any
  image_size: tuple[int, int]  # (H, W) the model is fed.
  pp: str  # Preprocessing of one encoded image, ending in values in [-1, 1].
  class_names: list[str] | None
  activation: str = 'softmax'  # 'softmax' or 'sigmoid' (models trained with sigmoid_xent).
  source: str = ''  # The checkpoint path, for messages.
  # Images with more decoded pixels are refused before decoding; None: the decode op's default
  # (8000 x 8000), 0: no limit.
  max_image_pixels: int | None = None
  # Cascades (family dvt): the exit thresholds per stage (models.dvt_adaptive); None otherwise.
  thresholds: tuple[float, ...] | None = None

  def __post_init__(self):
    self._apply = jax.jit(lambda p, x: self.model.apply({'params': p}, x, train=False))
    self._pp_fn = None

  @property
  def num_classes(self) -> int:
    return int(self.model_config.num_classes)

  def class_name(self, index: int) -> str:
    if self.class_names and 0 <= index < len(self.class_names):
      return self.class_names[index]
    return str(index)

  def preprocess(self, image: bytes | np.ndarray) -> np.ndarray:
    """Encoded bytes (or a uint8 HWC array) -> float32 (H, W, 3) in [-1, 1] for this model."""
    if self._pp_fn is None:
      self._pp_fn = preprocess.get_preprocess_fn(self.pp, max_pixels=self.max_image_pixels)
    out = np.asarray(self._pp_fn({'image': image})['image'], np.float32)
    if out.shape != (*self.image_size, 3):
      raise ValueError(
        f'preprocessing {self.pp!r} gave an image of shape {out.shape}, the model '
        f'needs {(*self.image_size, 3)}; pass --pp with a resize to that size'
      )
    return out

  def logits(self, images: np.ndarray) -> np.ndarray:
    """float32 logits (B, num_classes) of preprocessed images (B, H, W, 3)."""
    return np.asarray(self._apply(self.params, jnp.asarray(images, jnp.float32)))

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    logits = self.logits(images)
    if self.activation == 'sigmoid':
      return np.asarray(jax.nn.sigmoid(logits))
    return np.asarray(jax.nn.softmax(logits, axis=-1))


# ----------------------------------------------------------------------------------------------
# Loading.


def read_labels(path: str) -> list[str]:
  """Class names, one per line, in label order (blank trailing lines ignored)."""
  try:
    with open(path, encoding='utf-8') as f:
      names = [line.rstrip('\r\n') for line in f]
  except UnicodeDecodeError:
    raise ValueError(
      f'--labels={path} is not UTF-8 text; it needs one class name per line'
    ) from None
  except OSError as e:
    raise ValueError(f'--labels={path}: {e.strerror or e}') from None
  while names and not names[-1].strip():
    names.pop()
  if not names:
    raise ValueError(f'--labels={path} is empty; it needs one class name per line')
  return names


def _labels_for(path: str | None, num_classes: int) -> list[str] | None:
  """The names in ``path`` (None: no file), refused unless one per class."""
  if not path:
    return None
  names = read_labels(path)
  if len(names) != num_classes:
    raise ValueError(
      f'--labels={path} has {len(names)} names but the checkpoint has {num_classes} classes; '
      'give one name per class, in label order'
    )
  return names


def inference_pp(pp_test: str, image_size: tuple[int, int]) -> str:
  """The evaluation pp string for encoded files: label ops dropped, decode first, size fixed."""
  parts = [p.strip() for p in pp_test.split('|') if p.strip()]
  names = [re.match(r'\w+', p).group(0) if re.match(r'\w+', p) else p for p in parts]
  kept = [(n, p) for n, p in zip(names, parts) if n not in _LABEL_OPS]
  if not kept or kept[0][0] != 'decode':
    kept.insert(0, ('decode', 'decode'))
  if not any(n in _SIZE_OPS for n, _ in kept):
    h, w = image_size
    kept.insert(1, ('resize', f'resize(({h}, {w}))'))
  return '|'.join(p for _, p in kept)


def _npz_overrides(tree: dict, base_config: Any) -> dict[str, Any]:
  """Head width, representation size and (ViT) classifier read from a parameter tree."""
  overrides = {}
  if base_config.family == 'vit':
    # The pooling follows from the parameters: a class token, a MAP head, or neither (gap).
    if 'MAPHead_0' in tree:
      overrides['classifier'] = 'map'
    elif 'cls' in tree:
      if base_config.classifier not in ('token', 'token_unpooled'):
        overrides['classifier'] = 'token'
    elif base_config.classifier in ('token', 'token_unpooled', 'map'):
      overrides['classifier'] = 'gap'
  head = tree.get('head', {})
  if 'kernel' in head:
    overrides['num_classes'] = int(np.shape(head['kernel'])[-1])
  pre = tree.get('pre_logits', {})
  if 'kernel' in pre:
    overrides['representation_size'] = int(np.shape(pre['kernel'])[-1])
  return overrides


def _misfit(path: str, model: str, message: str) -> str:
  """``params_io.verify_tree``'s report in one line: counts, an example of each, the hint."""
  parts = []
  found = re.findall(
    r'(Missing keys|Unexpected keys|Shape mismatches) \((\d+)\):\n\s+(\S+)', message
  )
  for what, count, example in found:
    parts.append(f'{count} {what.lower()} (e.g. {example.rstrip(":")})')
  text = f'{path} does not fit --model={model}: {", ".join(parts)}'
  if 'Missing keys' in message or 'Unexpected keys' in message:
    return text + '; pass the model the checkpoint was trained as'
  hints = [line.strip()[len('Hint: ') :] for line in message.splitlines() if 'Hint: ' in line]
  return '; '.join([text, *hints])


def load_classifier(
  checkpoint_path: str,
  model: str | None = None,
  *,
  labels: str | None = None,
  resolution: Sequence[int] | int | None = None,
  pp: str | None = None,
  dtype: str | None = None,
  activation: str | None = None,
  ema: bool = False,
) -> Classifier:
  """A ``Classifier`` from a training workdir or an ``.npz`` file (see the module docstring).

  Args:
    checkpoint_path: workdir (config.json + checkpoints) or ``.npz`` parameter file.
    model: registry name; required for ``.npz``, checked against the workdir's otherwise.
    labels: class-name file (one per line); overrides the workdir's names.
    resolution: (H, W) or one int, for ``.npz`` checkpoints whose grid is not square.
    pp: preprocessing string replacing the default one (must give (H, W, 3) in [-1, 1]).
    dtype: compute dtype ('float32', 'bfloat16').
    activation: 'softmax' or 'sigmoid' (default: sigmoid only for sigmoid_xent workdirs).
    ema: the EMA parameters of the run (``config.ema_decay``): the workdir checkpoint's, or
      ``params_ema.npz`` for a workdir's ``params.npz`` (``workdir.ema_npz_path``).
  """
  if resolution is not None:
    resolution = sizes.pair(resolution, '--resolution')
  if workdir_lib.is_workdir(checkpoint_path):
    trained = workdir_lib.load_workdir(checkpoint_path, ema=ema)
    if model and models.resolve_name(model) != models.resolve_name(trained.config.model_name):
      raise ValueError(
        f'--model={model} but the workdir {checkpoint_path} trained '
        f'{trained.config.model_name}; leave --model out for a workdir'
      )
    model_config, module = trained.model_config, trained.model
    if dtype and dtype != model_config.dtype:
      config = trained.config.copy_and_resolve_references()
      config.dtype = dtype
      model_config, module = steps.make_model(
        config, model_config.num_classes, trained.image_shape[:2]
      )
    image_size = tuple(trained.image_shape[:2])
    if resolution and tuple(resolution) != image_size:
      raise ValueError(
        f"--resolution={resolution[0]},{resolution[1]} differs from the workdir's training "
        f"resolution {image_size[0]},{image_size[1]}; a workdir's model runs at its own "
        'resolution: leave --resolution out'
      )
    return Classifier(
      model_config=model_config,
      model=module,
      params=trained.params,
      image_size=image_size,
      pp=pp or inference_pp(trained.config.pp_test, image_size),
      class_names=_labels_for(labels, model_config.num_classes) or trained.class_names,
      activation=activation or ('sigmoid' if trained.config.loss == 'sigmoid_xent' else 'softmax'),
      source=checkpoint_path,
    )

  if paths.isdir(checkpoint_path):
    raise ValueError(
      f'{checkpoint_path} is a folder without config.json: pass a training '
      'workdir (python -m mixer_vit.main --workdir=...) or an .npz file'
    )
  if not os.path.exists(checkpoint_path) and '://' not in checkpoint_path:
    raise FileNotFoundError(f'checkpoint {checkpoint_path} not found')
  if ema:
    checkpoint_path = workdir_lib.ema_npz_path(checkpoint_path)
  if not model:
    raise ValueError(
      '--model is required for an .npz checkpoint (e.g. --model=ViT-B_16); '
      f'known models: {", ".join(models.list_models())}'
    )
  tree = params_io.load_npz(checkpoint_path)
  try:
    base_config = models.get_model_config(model)
  except (ValueError, KeyError) as e:
    raise ValueError(f'--model={model}: {cli.one_line(e)}') from None
  overrides = _npz_overrides(tree, base_config)
  if dtype:
    overrides['dtype'] = dtype
  if resolution:
    overrides['image_size'] = tuple(resolution)
  model_config = models.get_model_config(model, **overrides)
  tokens = registry.family(model_config).num_grid_tokens(tree)
  if tokens is not None and models.image_size_from_params(tree, model_config) is None:
    raise ValueError(
      f'{checkpoint_path}: its {tokens} tokens form no square grid, so its resolution is '
      'unknown; pass --resolution=H,W, the size it was trained at'
    )
  try:
    params = models.load_params(tree, model_config, resize=resolution is not None)
  except ValueError as e:
    if 'does not fit the model' in str(e):
      raise ValueError(_misfit(checkpoint_path, model, str(e))) from None
    if resolution is None:
      raise
    raise ValueError(f'--resolution={resolution[0]},{resolution[1]}: {e}') from None
  image_size = models.image_size_from_params(params, model_config)
  image_size = tuple(image_size or model_config.image_size)
  class_names = _labels_for(labels, model_config.num_classes)
  h, w = image_size
  return Classifier(
    model_config=model_config,
    model=models.build_model(model_config),
    params=params,
    image_size=image_size,
    pp=pp or f'decode|resize(({h}, {w}))|value_range(-1, 1)',
    class_names=class_names,
    activation=activation or 'softmax',
    source=checkpoint_path,
  )


# ----------------------------------------------------------------------------------------------
# Classifying files.


def list_images(paths: Iterable[str]) -> list[str]:
  """Files named directly, plus the image files found recursively in folders (sorted)."""
  found = []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        found.extend(
          os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    else:
      found.append(path)
  return found


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def error_text(error: Exception) -> str:
  """One readable line: TensorFlow's op-location prefix and suffix dropped."""
  text = str(error).strip().splitlines()
  text = text[0] if text else ''
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:[^\]]*\].*$', '', text).strip() or type(error).__name__
  # The decode guard's advice names training's setting; these commands take a flag.
  head, found, _ = text.partition('; raise the limit with ')
  if found:
    text = f'{head}; raise the limit with --max_image_pixels=N (0: no limit)'
  return f'{type(error).__name__}: {text}'


def classify_files(
  classifier: Classifier, paths: Sequence[str], top_k: int = 5, batch_size: int = 32
) -> Iterator[dict[str, Any]]:
  """Yields, per file in order, ``{'file', 'predictions': [{'label', 'name', 'probability'}]}``
  or ``{'file', 'error'}`` for a file that could not be read or decoded."""
  top_k = max(1, min(top_k, classifier.num_classes))
  pending: list[tuple[str, np.ndarray | None, str | None]] = []

  def flush():
    good = [(p, x) for p, x, e in pending if e is None]
    probs, exit_stage = {}, {}
    if good:
      batch = np.stack([x for _, x in good])
      if classifier.thresholds is not None:
        if getattr(classifier, '_cascade', None) is None:  # Compiled once for every batch.
          classifier._cascade = dvt_adaptive.AdaptiveCascade(
            classifier.model, classifier.params, batch_size
          )
        p, exits = classifier._cascade.predict(batch, classifier.thresholds)
        exit_stage.update(enumerate(exits))
      else:  # A fixed batch shape compiles once; the padding rows are dropped.
        padded = np.zeros((batch_size, *batch.shape[1:]), np.float32)
        padded[: len(batch)] = batch
        p = classifier.probabilities(padded)[: len(batch)]
      probs = {i: row for i, row in enumerate(p)}
    j = 0
    for path, _, error in pending:
      if error is not None:
        yield {'file': path, 'error': error}
        continue
      row = probs[j]
      j += 1
      order = np.argsort(-row, kind='stable')[:top_k]
      result = {
        'file': path,
        'predictions': [
          {'label': int(i), 'name': classifier.class_name(int(i)), 'probability': float(row[i])}
          for i in order
        ],
      }
      if j - 1 in exit_stage:
        result['exit_stage'] = int(exit_stage[j - 1])
      yield result
    pending.clear()

  for path in paths:
    try:
      pending.append((path, classifier.preprocess(_read(path)), None))
    except Exception as e:  # pylint: disable=broad-except  # Report and go on with the rest.
      pending.append((path, None, error_text(e)))
    if sum(e is None for _, _, e in pending) == batch_size:
      yield from flush()
  if pending:
    yield from flush()


def format_result(result: dict[str, Any]) -> str:
  if 'error' in result:
    return f'{result["file"]}: ERROR {result["error"]}'
  lines = [result['file']]
  if 'exit_stage' in result:
    lines[0] += f'  (answered by stage {result["exit_stage"]})'
  for p in result['predictions']:
    lines.append(f'  {p["probability"]:8.4f}  {p["label"]:>5d}  {p["name"]}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Command line.


def load_from_args(args: argparse.Namespace) -> Classifier:
  """The classifier the checkpoint flags (``cli.add_checkpoint_flags``) name.

  Raises ``cli.CommandError`` with one line naming the checkpoint (or the flag) at fault.
  """
  try:
    classifier = load_classifier(
      args.checkpoint,
      args.model,
      labels=getattr(args, 'labels', None),
      resolution=getattr(args, 'resolution', None),
      pp=getattr(args, 'pp', None),
      dtype=getattr(args, 'dtype', None),
      activation=getattr(args, 'activation', None),
      ema=getattr(args, 'ema', False),
    )
  except (ValueError, FileNotFoundError, KeyError) as e:
    text = cli.one_line(e)
    if args.checkpoint not in text and '--' not in text:
      text = f'--checkpoint={args.checkpoint}: {text}'
    raise cli.CommandError(text) from None
  classifier.max_image_pixels = getattr(args, 'max_image_pixels', None)
  return classifier


def _thresholds(text: str | None, classifier: Classifier) -> tuple[float, ...] | None:
  """The exit thresholds ``--thresholds`` gives a cascade (None for other models)."""
  if classifier.model_config.family != 'dvt':
    if text:
      raise ValueError(
        f'--thresholds: {classifier.source} is a {classifier.model_config.family} model; early '
        'exits need a Dynamic ViT cascade (family dvt)'
      )
    return None
  stages = len(classifier.model_config.stage_sizes)
  try:
    values = [float(t) for t in (text or '0.9').split(',')]
  except ValueError:
    raise ValueError(f'--thresholds={text}: give numbers, e.g. 0.9 or 0.8,0.9') from None
  if len(values) == 1:
    values = values * (stages - 1)
  if len(values) != stages - 1:
    raise ValueError(
      f'--thresholds={text}: give one value, or {stages - 1} (one per stage but the last)'
    )
  return tuple(values)


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(
    prog='python -m mixer_vit.infer',
    description=__doc__.split('\n\n')[0].strip(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('images', nargs='+', metavar='IMAGE_OR_FOLDER')
  cli.add_checkpoint_flags(
    parser, 'labels', 'resolution', 'pp', 'dtype', 'activation', 'ema', 'max_image_pixels'
  )
  parser.add_argument('--top_k', type=cli.positive_int, default=5)
  parser.add_argument('--batch_size', type=cli.positive_int, default=32)
  parser.add_argument('--json', action='store_true', help='one JSON object per line and image')
  parser.add_argument(
    '--thresholds',
    help='cascades (dvt): exit thresholds, one for every stage or one per stage but the last '
    '(default 0.9)',
  )
  args = parser.parse_args(argv)

  files = list_images(args.images)
  if not files:
    return cli.fail(
      ValueError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in {" ".join(args.images)}')
    )
  try:
    classifier = load_from_args(args)
  except cli.CommandError as e:
    return cli.fail(e)
  try:
    classifier.thresholds = _thresholds(args.thresholds, classifier)
  except ValueError as e:
    return cli.fail(e)
  failed = 0
  for result in classify_files(classifier, files, args.top_k, args.batch_size):
    if 'error' in result:
      failed += 1
      print(f'error: {result["file"]}: {result["error"]}', file=sys.stderr)
      if args.json:
        print(json.dumps(result), flush=True)
      continue
    print(json.dumps(result) if args.json else format_result(result), flush=True)
  if failed:
    print(f'{failed} of {len(files)} files could not be classified', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
