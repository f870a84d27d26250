r"""Exports a classifier for serving: a TensorFlow SavedModel (jax2tf) or an ONNX file (jax2onnx).

  python -m mixer_vit.export --checkpoint=WORKDIR --format=saved_model --out=exported/digits
  python -m mixer_vit.export --checkpoint=ViT-B_16.npz --model=ViT-B_16 \
      --labels=ilsvrc2012_wordnet_lemmas.txt --format=onnx --out=vit_b16.onnx

The checkpoint is read as ``mixer_vit.infer`` reads it (a training workdir, or an ``.npz`` file with
``--model``), so the export has the same model, evaluation preprocessing and class names.

SavedModel (``--format=saved_model``, a folder): the model is converted with ``jax2tf`` (native
serialization: the StableHLO of the JAX function, run by XLA inside TensorFlow), the batch
dimension symbolic, the parameters stored as TensorFlow variables. Two signatures:

- ``serving_default``: ``images``, a batch of encoded images (tf.string, JPEG/PNG/GIF/BMP bytes,
  any batch size from 1; an image that does not decode fails the request) -> ``labels`` (int32, (B, k)), ``names`` (tf.string, (B, k)) and
  ``probabilities`` (float32, (B, k)), the top ``--top_k`` classes. The checkpoint's evaluation
  preprocessing (``mixer_vit.data.preprocess``, TensorFlow ops) is inside, applied per image.
- ``logits``: ``images``, float32 (B, H, W, 3) already preprocessed (values in [-1, 1]) ->
  ``logits`` (float32, (B, num_classes)).

The export's facts (model, image size, preprocessing, activation, class names) are also written to
``assets.extra/mixer_vit_export.json`` in the folder.

ONNX (``--format=onnx``, one ``.onnx`` file): the ``logits`` signature only (input ``images``,
float32 (batch, H, W, 3) in [-1, 1]; output ``logits``), converted with ``jax2onnx``; the same facts
are in the file's metadata properties. Models over 1.5 GB of parameters keep their weights in a
``<out>.data`` file beside it.

After writing, the export is loaded in its own runtime (TensorFlow; onnxruntime) and its logits on
two random images are compared with the JAX model's (``--no-verify`` skips this). An existing
``--out`` is refused unless ``--overwrite`` is given, and even then only an earlier export of the
same format is replaced, told by its content (``software`` in the facts file or the ONNX metadata,
``cli.check_output``): a file or folder of the user's is never replaced.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import importlib
import io
import json
import logging
import os
import pathlib
import sys
from typing import Any

import jax
from jax.experimental import jax2tf
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from mixer_vit import cli
from mixer_vit import infer
from mixer_vit import models
from mixer_vit.data import preprocess
from mixer_vit.models import params_io
from mixer_vit.runtime import paths

FORMATS = ('saved_model', 'onnx')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
INFO_FILE = os.path.join('assets.extra', 'mixer_vit_export.json')
# Above this many bytes of parameters an ONNX file keeps its weights in a side file (protobuf
# messages are limited to 2 GB).
ONNX_EXTERNAL_DATA_BYTES = 1_500_000_000
ONNX_OPSET = 21
# Relative tolerance of the check after export (float32; the tests use 1e-4).
VERIFY_RTOL = 1e-4


class ExportError(cli.CommandError):
  """Bad export arguments, an --out that may not be replaced, or missing optional packages."""


@dataclasses.dataclass
class Exportable:
  """A classifier in the form that is exported: layers unrolled, parameters as numpy arrays."""

  classifier: infer.Classifier
  model: Any  # flax module (scan=False)
  params: dict  # numpy arrays

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(self.classifier.image_size)

  def logits_fn(self) -> Callable[[Any, Any], Any]:
    """``(params, images) -> float32 logits``, the function that is converted."""
    model = self.model

    def fn(params, images):
      logits = model.apply({'params': params}, images, train=False)
      return logits.astype(jnp.float32)

    return fn

  def jax_logits(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(self.logits_fn())(self.params, jnp.asarray(images, jnp.float32)))

  def info(self, fmt: str, top_k: int | None = None) -> dict[str, Any]:
    c = self.classifier
    names = [c.class_name(i) for i in range(c.num_classes)]
    out = {
      'format': fmt,
      'software': cli.SOFTWARE,
      'source': c.source,
      'model_name': str(c.model_config.get('name', '')),
      'image_size': list(self.image_size),
      'preprocessing': c.pp,
      'input_range': [-1.0, 1.0],
      'num_classes': c.num_classes,
      'activation': c.activation,
      'class_names': names,
    }
    if top_k is not None:
      out['top_k'] = top_k
    return out


def prepare(classifier: infer.Classifier) -> Exportable:
  """Unrolls scan-stacked layers (one graph per layer exports and serves more simply)."""
  params = params_io.to_numpy(classifier.params)
  model = classifier.model
  if params_io.is_stacked(params) or classifier.model_config.get('scan'):
    params = params_io.unstack_layers(params)
    config = ml_collections.ConfigDict(classifier.model_config.to_dict())
    config.scan = False
    model = models.build_model(config)
  return Exportable(classifier=classifier, model=model, params=params)


def _random_images(image_size: tuple[int, int], batch: int, seed: int = 0) -> np.ndarray:
  h, w = image_size
  return np.random.default_rng(seed).uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)


def _relative_difference(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))


# ----------------------------------------------------------------------------------------------
# Where the export goes.


def _check_out(out: str, fmt: str, overwrite: bool) -> None:
  """Refuses an existing --out unless --overwrite, and even then anything but an earlier export
  of ``fmt`` (``cli.check_output``)."""
  if not out:
    raise ExportError('--out is empty; name the folder (saved_model) or .onnx file to write')
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise ExportError(f'--out={out}: the folder {parent} does not exist; create it first')
  try:
    if fmt == 'saved_model':
      cli.check_output(out, '--out', overwrite=overwrite, ours=saved_model_is_ours, what='folder')
    else:
      cli.check_output(out, '--out', overwrite=overwrite, ours=onnx_is_ours, example='model.onnx')
  except cli.CommandError as e:
    raise ExportError(str(e)) from None


def saved_model_is_ours(path: str) -> bool:
  """Whether ``path`` is a SavedModel folder this module wrote (its facts file says so)."""
  if not os.path.isfile(os.path.join(path, 'saved_model.pb')):
    return False
  try:
    with open(os.path.join(path, INFO_FILE), encoding='utf-8') as f:
      info = json.load(f)
  except (OSError, ValueError):
    return False
  # Exports written before the 'software' entry existed carry the format.
  return isinstance(info, dict) and (
    cli.is_ours(info.get('software')) or info.get('format') == 'saved_model'
  )


def onnx_is_ours(path: str) -> bool:
  """Whether ``path`` is an ONNX file this module wrote (its metadata properties say so)."""
  meta = onnx_metadata(path)
  return meta is not None and (cli.is_ours(meta.get('software')) or meta.get('format') == 'onnx')


def _varint(f: Any) -> int | None:
  """A protobuf varint from a binary stream; None at its end or past 64 bits."""
  value = shift = 0
  while shift < 64:
    byte = f.read(1)
    if not byte:
      return None
    value |= (byte[0] & 0x7F) << shift
    if not byte[0] & 0x80:
      return value
    shift += 7
  return None


def _fields(f: Any, end: int) -> Iterator[tuple[int, int | bytes | None]]:
  """(field number, value) of the protobuf message in ``f`` up to ``end``: varints as ints,
  length-delimited fields of ``_READ_FIELDS`` as bytes and others skipped (None). A ValueError
  when the bytes are no protobuf message."""
  while f.tell() < end:
    key = _varint(f)
    if key is None or key >> 3 == 0:
      raise ValueError('not a protobuf message')
    field, wire = key >> 3, key & 7
    if wire == 0:
      value = _varint(f)
      if value is None:
        raise ValueError('truncated varint')
      yield field, value
    elif wire in (1, 5):
      f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
      yield field, None
    elif wire == 2:
      length = _varint(f)
      if length is None or f.tell() + length > end:
        raise ValueError('truncated field')
      if field in _READ_FIELDS and length <= 1 << 20:
        yield field, f.read(length)
      else:
        f.seek(length, os.SEEK_CUR)
        yield field, None
    else:
      raise ValueError(f'wire type {wire}')
  if f.tell() != end:
    raise ValueError('truncated message')


# ModelProto.metadata_props (14) and its StringStringEntryProto key (1) and value (2).
_READ_FIELDS = (1, 2, 14)


def onnx_metadata(path: str) -> dict[str, str] | None:
  """The ``metadata_props`` of an ONNX file, read from its top-level protobuf fields (no onnx
  import, the graph skipped); None when the file is not an ONNX model."""
  props = {}
  try:
    end = os.path.getsize(path)
    with open(path, 'rb') as f:
      ir_version = None
      for field, value in _fields(f, end):
        if field == 1 and isinstance(value, int):
          ir_version = value
        elif field == 14 and isinstance(value, bytes):
          entry = dict(_fields(io.BytesIO(value), len(value)))
          key, text = entry.get(1), entry.get(2, b'')
          if isinstance(key, bytes) and isinstance(text, bytes):
            props[key.decode('utf-8', 'replace')] = text.decode('utf-8', 'replace')
  except (OSError, ValueError):
    return None
  return props if ir_version else None


def size_bytes(path: str) -> int:
  """Size of a file, or of all files in a folder."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(
    os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
  )


# ----------------------------------------------------------------------------------------------
# SavedModel.


def _preprocess_batch(pp: str, image_size: tuple[int, int]) -> Callable[[tf.Tensor], tf.Tensor]:
  """Encoded images (B,) -> float32 (B, H, W, 3), the pp string applied to each."""
  pp_fn = preprocess.get_preprocess_fn(pp)
  shape = (*image_size, 3)

  def one(encoded):
    image = pp_fn({'image': encoded})['image']
    if not image.shape.is_fully_defined() or tuple(image.shape) != shape:
      raise ExportError(
        f'preprocessing {pp!r} gives images of shape {image.shape}, the model needs '
        f'{shape}; pass --pp ending in a fixed size, e.g. resize({shape[:2]})'
      )
    return tf.ensure_shape(tf.cast(image, tf.float32), shape)

  @tf.function(autograph=False)
  def batch(encoded):
    return tf.map_fn(one, encoded, fn_output_signature=tf.TensorSpec(shape, tf.float32))

  return batch


def build_saved_model_module(
  exportable: Exportable, top_k: int = 5, platforms: Sequence[str] | None = None
) -> tf.Module:
  """A ``tf.Module`` with the parameters as variables and the two serving functions."""
  c = exportable.classifier
  h, w = exportable.image_size
  top_k = _check_top_k(top_k, c.num_classes)
  logits_tf = jax2tf.convert(
    exportable.logits_fn(),
    polymorphic_shapes=[None, f'(b, {h}, {w}, 3)'],
    with_gradient=False,
    native_serialization_platforms=tuple(platforms) if platforms else None,
  )
  module = tf.Module()
  module.params = tf.nest.map_structure(
    lambda a: tf.Variable(a, trainable=False), exportable.params
  )
  names = tf.constant([c.class_name(i) for i in range(c.num_classes)])
  pp_batch = _preprocess_batch(c.pp, (h, w))
  activation = c.activation

  @tf.function(
    autograph=False, input_signature=[tf.TensorSpec((None, h, w, 3), tf.float32, name='images')]
  )
  def logits(images):
    return {'logits': logits_tf(module.params, images)}

  @tf.function(autograph=False, input_signature=[tf.TensorSpec((None,), tf.string, name='images')])
  def classify(images):
    scores = logits_tf(module.params, pp_batch(images))
    probs = tf.nn.sigmoid(scores) if activation == 'sigmoid' else tf.nn.softmax(scores, axis=-1)
    top = tf.math.top_k(probs, k=top_k)
    return {
      'labels': top.indices,
      'names': tf.gather(names, top.indices),
      'probabilities': top.values,
    }

  module.logits = logits
  module.classify = classify
  return module


def export_saved_model(
  exportable: Exportable,
  out: str,
  *,
  top_k: int = 5,
  platforms: Sequence[str] | None = None,
  overwrite: bool = False,
) -> str:
  """Writes the SavedModel folder ``out`` (see the module docstring); returns ``out``."""
  _check_out(out, 'saved_model', overwrite)
  module = build_saved_model_module(exportable, top_k, platforms)
  signatures = {
    'serving_default': module.classify.get_concrete_function(),
    'logits': module.logits.get_concrete_function(),
  }
  info = exportable.info('saved_model', _check_top_k(top_k, exportable.classifier.num_classes))
  info['platforms'] = list(platforms or [jax.default_backend()])
  with paths.staged_path(out) as staged:
    tf.saved_model.save(module, staged, signatures=signatures)
    os.makedirs(os.path.join(staged, os.path.dirname(INFO_FILE)), exist_ok=True)
    with open(os.path.join(staged, INFO_FILE), 'w', encoding='utf-8') as f:
      json.dump(info, f, indent=1)
  return out


def saved_model_logits(path: str, images: np.ndarray) -> np.ndarray:
  """The ``logits`` signature of a SavedModel on float images (B, H, W, 3)."""
  loaded = tf.saved_model.load(path)
  return loaded.signatures['logits'](images=tf.constant(images, tf.float32))['logits'].numpy()


# ----------------------------------------------------------------------------------------------
# ONNX.


def _import_onnx(need_runtime: bool = False):
  """jax2onnx and onnx (and onnxruntime), or an ExportError naming what is missing."""
  missing = []
  modules = {}
  # Optional and heavy (about 260 MB with their dependencies): imported only for ONNX.
  for name in ('jax2onnx', 'onnx') + (('onnxruntime',) if need_runtime else ()):
    try:
      with _quiet():
        modules[name] = importlib.import_module(name)
    except ImportError as e:
      missing.append(f'{name} ({e})')
  if missing:
    raise ExportError(
      f'--format=onnx needs {", ".join(missing)}: install the pinned versions with '
      '.venv/bin/pip install -r requirements.txt'
    )
  return modules


def _import_jax2onnx_plugins() -> None:
  """Registers only the jax and flax plugins of jax2onnx.

  On first use jax2onnx imports every plugin it ships, Equinox's and its examples' too (about
  15 s of CPU, most of it Equinox); these models need only the jax and flax ones. This reaches
  into jax2onnx's plugin system (the pinned version's); when that changes, jax2onnx imports all
  of its plugins itself as before.
  """
  try:
    plugin_system = importlib.import_module('jax2onnx.plugins.plugin_system')
    if plugin_system._already_imported_plugins:
      return
    root = pathlib.Path(plugin_system.__file__).parent
    for sub in ('jax', 'flax'):
      plugin_system._import_tree(root / sub, f'jax2onnx.plugins.{sub}')
    plugin_system._already_imported_plugins = True
  except (ImportError, AttributeError):
    pass


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """jax2onnx prints debugging lines and logs every optional plugin it cannot import."""
  logger = logging.getLogger('jax2onnx')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    logger.setLevel(level)


def build_onnx_model(exportable: Exportable):
  """The ``onnx.ModelProto`` of the logits function (batch dimension symbolic)."""
  jax2onnx = _import_onnx()['jax2onnx']
  h, w = exportable.image_size
  params = jax.tree.map(jnp.asarray, exportable.params)
  fn = exportable.logits_fn()
  with _quiet():
    _import_jax2onnx_plugins()
    proto = jax2onnx.to_onnx(
      lambda images: fn(params, images),
      inputs=[('batch', h, w, 3)],  # float32; 'batch' is a symbolic dimension.
      model_name=str(exportable.classifier.model_config.get('name', 'model')),
      opset=ONNX_OPSET,
      input_names=['images'],
      output_names=['logits'],
    )
  info = exportable.info('onnx')
  for key, value in info.items():
    entry = proto.metadata_props.add()
    entry.key = key
    entry.value = value if isinstance(value, str) else json.dumps(value)
  return proto


def export_onnx(exportable: Exportable, out: str, *, overwrite: bool = False) -> str:
  """Writes the ONNX file ``out`` (weights in ``out + '.data'`` for large models)."""
  _check_out(out, 'onnx', overwrite)
  onnx = _import_onnx()['onnx']
  proto = build_onnx_model(exportable)
  param_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(exportable.params))
  external = param_bytes > ONNX_EXTERNAL_DATA_BYTES
  data_name = os.path.basename(out) + '.data'
  data_out = os.path.join(os.path.dirname(os.path.abspath(out)), data_name)
  if external and os.path.lexists(data_out) and not (overwrite and onnx_is_ours(out)):
    raise ExportError(
      f'{data_out} (where the weights of --out={out} go) exists and is not part of an earlier '
      'export there; move it away or choose another --out'
    )
  with paths.staged_path(out) as target:
    if external:
      onnx.save_model(
        proto, target, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
      )
      os.replace(os.path.join(os.path.dirname(target), data_name), data_out)
    else:
      onnx.save_model(proto, target)
  return out


def onnx_logits(path: str, images: np.ndarray) -> np.ndarray:
  """The ONNX file's logits under onnxruntime (CPU) for float images (B, H, W, 3)."""
  ort = _import_onnx(need_runtime=True)['onnxruntime']
  session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  return session.run(['logits'], {'images': np.asarray(images, np.float32)})[0]


# ----------------------------------------------------------------------------------------------
# Both.


def _check_top_k(top_k: int, num_classes: int) -> int:
  if top_k < 1:
    raise ExportError(f'--top_k={top_k}: it must be at least 1')
  return min(int(top_k), int(num_classes))


def _parse_platforms(text: str | None) -> tuple[str, ...] | None:
  if not text:
    return None
  names = tuple(p.strip() for p in text.split(',') if p.strip())
  bad = [p for p in names if p not in PLATFORMS]
  if bad or not names:
    raise ExportError(f'--platforms={text}: use a comma-separated subset of {", ".join(PLATFORMS)}')
  return names


def export(
  classifier: infer.Classifier,
  out: str,
  fmt: str = 'saved_model',
  *,
  top_k: int = 5,
  platforms: Sequence[str] | None = None,
  overwrite: bool = False,
) -> str:
  """Exports ``classifier`` (``infer.load_classifier``) as ``fmt`` to ``out``; returns ``out``."""
  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt}: use one of {", ".join(FORMATS)}')
  exportable = prepare(classifier)
  if fmt == 'saved_model':
    return export_saved_model(
      exportable, out, top_k=top_k, platforms=platforms, overwrite=overwrite
    )
  if platforms and tuple(platforms) != ('cpu',):
    raise ExportError('--platforms is for --format=saved_model; an ONNX file runs anywhere')
  return export_onnx(exportable, out, overwrite=overwrite)


def verify(classifier: infer.Classifier, out: str, fmt: str, batch: int = 2) -> float:
  """Relative difference of the export's logits from the JAX model's on random images."""
  exportable = prepare(classifier)
  images = _random_images(exportable.image_size, batch)
  want = exportable.jax_logits(images)
  got = saved_model_logits(out, images) if fmt == 'saved_model' else onnx_logits(out, images)
  return _relative_difference(got, want)


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(
    prog='python -m mixer_vit.export',
    description=__doc__.split('\n\n')[0].strip(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  cli.add_checkpoint_flags(parser, 'labels', 'resolution', 'pp', 'activation')
  parser.add_argument('--format', required=True, choices=FORMATS)
  parser.add_argument('--out', required=True, help='SavedModel folder or .onnx file to write')
  parser.add_argument(
    '--top_k', type=cli.positive_int, default=5, help='classes the bytes signature returns'
  )
  parser.add_argument(
    '--platforms', help='SavedModel: comma-separated subset of cpu,cuda,rocm,tpu (default: cpu)'
  )
  parser.add_argument('--overwrite', action='store_true', help='replace an earlier export')
  parser.add_argument(
    '--verify',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='load the export and compare its logits with JAX (default: on)',
  )
  args = parser.parse_args(argv)

  try:
    platforms = _parse_platforms(args.platforms)
    _check_out(args.out, args.format, args.overwrite)
    if args.format == 'onnx':
      _import_onnx(need_runtime=args.verify)
    classifier = infer.load_from_args(args)
    _check_top_k(args.top_k, classifier.num_classes)
    out = export(
      classifier,
      args.out,
      args.format,
      top_k=args.top_k,
      platforms=platforms,
      overwrite=args.overwrite,
    )
  except (ValueError, FileNotFoundError, KeyError) as e:
    return cli.fail(e)
  print(f'wrote {out} ({size_bytes(out) / 2**20:.1f} MiB, {args.format})')
  if args.verify:
    difference = verify(classifier, out, args.format)
    ok = difference <= VERIFY_RTOL
    print(
      f'verify: logits on 2 random images differ from JAX by {difference:.2e} (relative; '
      f'{"ok" if ok else "over " + format(VERIFY_RTOL, ".0e")})'
    )
    if not ok:
      return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
