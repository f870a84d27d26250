"""Image-folder data sets: ``ROOT/<split>/<class>/*.{jpg,jpeg,png}``.

Classes are the sorted folder names of ``ROOT/train`` (or of the first split present), so labels
agree between splits. Within a split, files are ordered by the MD5 of their relative path: a fixed
pseudo-random order that does not depend on the machine, so split slices such as
``train[:90%]`` / ``train[90%:]`` are class-balanced in expectation and stable.

Images are decoded by the ``decode`` preprocessing op (grey and RGBA become RGB). A file that
cannot be decoded, or whose image has more than ``max_pixels`` pixels (``images``), stops the
pipeline with an error that names it; with ``skip_corrupt=True`` every file is test-decoded once
when the split is opened and those are left out and logged. Splits whose files total at most ``in_memory_max_bytes`` are read into memory once.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re

from absl import logging
import numpy as np
import PIL.Image
import tensorflow as tf

from mixer_vit.data import base
from mixer_vit.data import images

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_HEADER_SAMPLE = 16  # Files whose header sizes are compared before decoding a folder into memory.
_SPLIT_RE = re.compile(r'^\s*([\w.-]+)\s*(?:\[\s*([^\]:]*?)\s*:\s*([^\]:]*?)\s*\])?\s*$')


class CorruptImageError(ValueError):
  """An image file that cannot be decoded (or is over the limit on decoded pixels)."""


def _bound(text: str, n: int, default: int) -> int:
  if not text:
    return default
  if text.endswith('%'):
    value = round(n * float(text[:-1]) / 100)
  else:
    value = int(text)
  return max(0, min(n, value + n if value < 0 else value))


def parse_split(split: str) -> list[tuple[str, str, str]]:
  """``'train[:90%]+test'`` -> ``[('train', '', '90%'), ('test', '', '')]`` (tfds-like slices)."""
  parts = []
  for part in split.split('+'):
    m = _SPLIT_RE.match(part)
    if not m:
      raise ValueError(
        f"cannot parse split {split!r}; use e.g. 'train', 'test', 'train[:90%]', "
        "'train[1000:]', 'train[:50%]+test'"
      )
    parts.append((m.group(1), m.group(2) or '', m.group(3) or ''))
  return parts


def _decode_error(data: bytes, max_pixels: int) -> str | None:
  """Why ``data`` cannot be decoded within ``max_pixels``, or None."""
  try:
    images.decode(data, 3, max_pixels)
    return None
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    return str(e.message).split('\n')[0]


def _is_local(path: str) -> bool:
  return '://' not in path


def _total_size(paths: list[str]) -> int:
  if paths and _is_local(paths[0]):
    return sum(os.path.getsize(p) for p in paths)
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return sum(pool.map(lambda p: tf.io.gfile.stat(p).length, paths, chunksize=256))


def _read_all(paths: list[str]) -> list[bytes]:
  """File contents; sequential for local disks (fastest), 16 threads for remote storage."""

  def read(path):
    if _is_local(path):
      with open(path, 'rb') as f:
        return f.read()
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()

  if paths and _is_local(paths[0]):
    return [read(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return list(pool.map(read, paths))


def _header_size(path: str) -> tuple[int, int] | None:
  """(width, height) from an image file's header (PIL reads no pixels), or None."""
  try:
    if _is_local(path):
      with PIL.Image.open(path) as image:
        return image.size
    with tf.io.gfile.GFile(path, 'rb') as f, PIL.Image.open(f) as image:
      return image.size
  except (OSError, ValueError, PIL.Image.DecompressionBombError):
    return None


class ImageFolder(base.Source):
  """The image folder at ``root``."""

  def __init__(
    self,
    root: str,
    skip_corrupt: bool = False,
    in_memory_max_bytes: int = base.DEFAULT_IN_MEMORY_MB * 2**20,
    max_pixels: int = base.DEFAULT_MAX_IMAGE_PIXELS,
  ):
    self.root = os.path.expanduser(root)
    self.name = self.root
    if not tf.io.gfile.isdir(self.root):
      raise FileNotFoundError(
        f'image folder {self.root!r} does not exist; expected '
        'ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg'
      )
    available = sorted(
      d.rstrip('/')
      for d in tf.io.gfile.listdir(self.root)
      if tf.io.gfile.isdir(os.path.join(self.root, d))
    )
    if not available:
      raise FileNotFoundError(
        f'image folder {self.root!r} has no split folders; expected '
        'ROOT/train/<class>/* and ROOT/test/<class>/*'
      )
    self._available = available
    reference = 'train' if 'train' in available else available[0]
    self.class_names = self._class_dirs(reference)
    if not self.class_names:
      raise FileNotFoundError(f'{os.path.join(self.root, reference)} has no class folders')
    self.num_classes = len(self.class_names)
    self.image_shape = None
    self._skip_corrupt = skip_corrupt
    self.skipped: dict[str, list[str]] = {}  # split folder -> corrupt files left out
    self._in_memory_max_bytes = in_memory_max_bytes
    self._max_pixels = max_pixels
    self._files: dict[str, list[tuple[str, int]]] = {}

  def _class_dirs(self, split_name: str) -> list[str]:
    path = os.path.join(self.root, split_name)
    return sorted(
      d.rstrip('/') for d in tf.io.gfile.listdir(path) if tf.io.gfile.isdir(os.path.join(path, d))
    )

  def _base_files(self, split_name: str) -> list[tuple[str, int]]:
    """(path, label) of a split folder in the fixed MD5 order; corrupt ones left out if asked."""
    if split_name in self._files:
      return self._files[split_name]
    if split_name not in self._available:
      raise ValueError(
        f'split {split_name!r} not found in image folder {self.root!r}; it has {self._available}'
      )
    unknown = sorted(set(self._class_dirs(split_name)) - set(self.class_names))
    if unknown:
      raise ValueError(
        f'{os.path.join(self.root, split_name)} has class folders {unknown} that '
        f'are not in the class list {self.class_names} (from the train folder)'
      )
    files, ignored, empty = [], 0, []
    for label, name in enumerate(self.class_names):
      class_dir = os.path.join(self.root, split_name, name)
      if not tf.io.gfile.isdir(class_dir):
        continue
      found = len(files)
      for f in tf.io.gfile.listdir(class_dir):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          files.append((os.path.join(class_dir, f), label))
        else:
          ignored += 1
      if len(files) == found:
        empty.append(class_dir)
    if empty:  # Trained without examples, its label unused: refused rather than silently so.
      more = f' (and {len(empty) - 1} more: {", ".join(empty[1:4])})' if len(empty) > 1 else ''
      raise ValueError(
        f'class folder {empty[0]} has no images (.jpg/.jpeg/.png){more}: its class would never '
        'be trained or tested. Add images to it, or remove that class folder from every split '
        f'of {self.root} (the classes after it are then renumbered).'
      )
    if ignored:
      logging.info('%s: ignored %d files that are not .jpg/.jpeg/.png', split_name, ignored)
    files.sort(
      key=lambda f: hashlib.md5(os.path.relpath(f[0], self.root).encode('utf-8')).hexdigest()
    )
    if self._skip_corrupt:
      files = self._drop_corrupt(split_name, files)
    self._files[split_name] = files
    return files

  def _drop_corrupt(self, split_name, files):
    paths = tf.constant([p for p, _ in files] or [''])
    ds = (
      tf.data.Dataset.range(len(files))
      .map(
        lambda i: (
          i,
          tf.shape(images.decode(tf.io.read_file(tf.gather(paths, i)), 3, self._max_pixels)),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
      )
      .ignore_errors()
    )
    good = {int(i) for i, _ in ds.as_numpy_iterator()}
    bad = [files[i][0] for i in range(len(files)) if i not in good]
    if bad:
      logging.warning(
        'skip_corrupt: skipped %d corrupt image file(s) in %s/%s (undecodable, or over '
        'max_image_pixels=%d): %s%s',
        len(bad),
        self.root,
        split_name,
        self._max_pixels,
        ', '.join(bad[:10]),
        ' ...' if len(bad) > 10 else '',
      )
    self.skipped[split_name] = bad
    return [f for i, f in enumerate(files) if i in good]

  def _files_of(self, split: str) -> list[tuple[str, int]]:
    chosen = []
    for name, start, stop in parse_split(split):
      files = self._base_files(name)
      n = len(files)
      chosen.extend(files[_bound(start, n, 0) : _bound(stop, n, n)])
    return chosen

  def check_one_size(self, split: str, pp_key: str, pp: str) -> None:
    """Raises ValueError naming a file of ``split`` whose size differs from the others' (read
    from the file headers with PIL, nothing decoded), for a preprocessing ``pp`` that does not
    resize: batches of such images cannot be formed."""
    files = [path for path, _ in self._files_of(split)]
    if files and _is_local(files[0]):
      found = map(_header_size, files)
    else:  # One request per file on remote storage: 16 at a time.
      with concurrent.futures.ThreadPoolExecutor(16) as pool:
        found = list(pool.map(_header_size, files, chunksize=64))
    sizes: dict[tuple[int, int], list[str]] = {}
    for path, size in zip(files, found):
      if size is not None:  # An unreadable header: named when the file is decoded.
        sizes.setdefault(size, []).append(path)
    if len(sizes) < 2:
      return
    common = max(sizes, key=lambda s: len(sizes[s]))
    odd = [(path, size) for size, group in sizes.items() if size != common for path in group]
    (path, (w, h)), (cw, ch) = odd[0], common
    more = f' ({len(odd) - 1} more files of other sizes)' if len(odd) > 1 else ''
    size = str(ch) if ch == cw else f'({ch}, {cw})'
    raise ValueError(
      f'{path} is {w}x{h} but the other images of split {split!r} of {self.root} are {cw}x{ch} '
      f'(e.g. {sizes[common][0]}){more}, and {pp_key}={pp!r} does not resize them, so they '
      f'cannot be batched: add a resize to {pp_key} (e.g. decode|resize({size})|...) or '
      'resize the files.'
    )

  def num_examples(self, split):
    return len(self._files_of(split))

  def _decode_all(self, data: list[bytes], paths: list[str], where: str) -> np.ndarray | None:
    """All images decoded to one uint8 array when they share a shape and fit the memory limit.

    Small data sets such as CIFAR-10 are then decoded once instead of at every step. Returns
    None (keep the encoded bytes) for mixed sizes, corrupt files or too much memory. The sizes
    of a sample of files are read from their headers first (nothing decoded), so that a folder
    of mixed sizes (most photo collections) is recognised at once; the log says why.
    """
    sample = sorted(set(np.linspace(0, len(data) - 1, min(len(data), _HEADER_SAMPLE)).astype(int)))
    try:
      sizes = {int(i): tuple(int(v) for v in images.header_size(data[i]).numpy()) for i in sample}
    except tf.errors.OpError:  # A corrupt header: found again, and named, when it is read.
      return None
    known = [i for i in sample if sizes[i] != (0, 0)]  # (0, 0): no size in the header.
    other = [i for i in known if sizes[i] != sizes[known[0]]]
    if other:
      logging.info(
        '%s: images of different sizes (%s is %dx%d, %s is %dx%d); the %d files stay encoded in '
        'memory and are decoded at every step (images of one size are decoded once)',
        where,
        paths[known[0]],
        *sizes[known[0]],
        paths[other[0]],
        *sizes[other[0]],
        len(data),
      )
      return None
    if len(known) == len(sample):
      first = sizes[sample[0]]
    else:  # Decode one to know its size.
      try:
        first = tuple(images.decode(data[0], 3, self._max_pixels).shape[:2])
      except tf.errors.OpError:
        return None
    shape = (*first, 3)
    if len(data) * int(np.prod(shape)) > self._in_memory_max_bytes:
      logging.info(
        '%s: %d decoded images of shape %s would take %.0f MB, over in_memory_max_mb; the files '
        'stay encoded in memory and are decoded at every step',
        where,
        len(data),
        shape,
        len(data) * np.prod(shape) / 2**20,
      )
      return None
    encoded = tf.constant(np.asarray(data, dtype=object))

    def decode(i):
      image = images.decode(tf.gather(encoded, i), 3, self._max_pixels)
      same = tf.reduce_all(tf.equal(tf.shape(image), shape))
      # A different size is reported by index, not by a failing batch (a confusing TF warning).
      fixed = tf.cond(
        same, lambda: tf.ensure_shape(image, shape), lambda: tf.zeros(shape, tf.uint8)
      )
      return fixed, same

    ds = (
      tf.data.Dataset.range(len(data))
      .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      .batch(4096)
    )
    try:
      parts = list(ds.as_numpy_iterator())
    except tf.errors.OpError:  # An undecodable file or one over max_pixels: named when read.
      return None
    same = np.concatenate([p[1] for p in parts])
    if not same.all():
      k = int(np.argmin(same))
      logging.info(
        '%s: images of different sizes (%s is not %dx%d like %s); the %d files stay encoded in '
        'memory and are decoded at every step (images of one size are decoded once)',
        where,
        paths[k],
        *first,
        paths[0],
        len(data),
      )
      return None
    decoded = np.concatenate([p[0] for p in parts])
    logging.info(
      'Decoded %d images of shape %s into memory (%.1f MB)',
      len(decoded),
      shape,
      decoded.nbytes / 2**20,
    )
    return decoded

  def _open(self, split) -> base.Split:
    files = self._files_of(split)
    if not files:
      raise ValueError(f'split {split!r} of image folder {self.root!r} has no images')
    paths = [p for p, _ in files]
    labels = np.asarray([label for _, label in files], np.int64)
    total = _total_size(paths)

    if total <= self._in_memory_max_bytes:
      data = _read_all(paths)
      logging.info(
        'Read %s[%s] into memory: %d files, %.1f MB', self.root, split, len(paths), total / 2**20
      )
      decoded = self._decode_all(data, paths, f'image folder {self.root!r}, split {split!r}')
      if decoded is not None:
        return base.in_memory_split(decoded, labels)

      def check(i):
        error = _decode_error(data[i], self._max_pixels)
        return f'{paths[i]} ({error})' if error else None

      return base.in_memory_split(np.asarray(data, dtype=object), labels, check)

    paths_t = tf.constant(paths)
    labels_t = tf.constant(labels)

    def load(i):
      return {'image': tf.io.read_file(tf.gather(paths_t, i)), 'label': tf.gather(labels_t, i)}

    def check(i):
      error = _decode_error(_read_all([paths[i]])[0], self._max_pixels)
      return f'{paths[i]} ({error})' if error else None

    return base.RandomAccessSplit(
      len(paths), load, check, storage=('files', np.asarray(paths), labels)
    )
