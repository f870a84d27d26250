"""The one path layer for workdir files: local paths and URLs (``gs://``, ``ram://``, ...) alike.

Local paths (no ``scheme://``) go through ``os`` and ``open`` exactly as before this module
existed: writes go to a temporary file next to the target, renamed over it (atomic on POSIX).
URLs go through ``tf.io.gfile``, chosen over ``etils.epath`` because:

- TensorFlow is already a dependency (the input pipeline), and its file systems are what the
  TensorBoard writer and ``tf.data`` use anyway, so every workdir file takes the same route;
- it has an in-memory file system, ``ram://``, on which the test suite runs a whole workdir offline
  (``epath`` knows no ``ram://``, and for ``gs://`` it calls ``tf.io.gfile`` itself when TF is
  installed).

On an object store a rename is a copy and a delete, not atomic, so ``write_bytes`` writes a URL
in one object write instead: GCS makes an object visible only once its upload has completed, so
a reader sees the old object or the new one, never half of it. Moving a folder (``move_tree``) is
a copy of every object and then a delete of the originals there: not atomic (a crash in between
leaves both, which ``move_tree`` callers tolerate). Orbax checkpoints do not go through here:
Orbax takes the same paths and URLs itself (its ``gs://`` writes go through TensorStore).

TensorFlow is imported on the first URL only (it takes seconds to import).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import errno
import io
import os
import re
import shutil
import tempfile
from typing import BinaryIO


def is_remote(path: str) -> bool:
  """True for a URL (``gs://bucket/run``, ``ram://run``): handled by ``tf.io.gfile``."""
  return '://' in os.fspath(path)


def _gfile():
  import tensorflow as tf  # noqa: PLC0415  (heavy: imported for the first URL only)

  return tf.io.gfile


def join(path: str, *names: str) -> str:
  """``os.path.join`` for local paths; one ``/`` between the parts of a URL (``gs://`` kept)."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.join(path, *names)
  for name in names:
    path = (path if path.endswith('/') else path + '/') + name.lstrip('/')
  return path


def absolute(path: str) -> str:
  """A local path made absolute; a URL unchanged (``os.path.abspath`` would turn ``gs://b/r``
  into ``CWD/gs:/b/r``)."""
  return path if is_remote(path) else os.path.abspath(path)


def dirname(path: str) -> str:
  if not is_remote(path):
    return os.path.dirname(path)
  scheme, rest = path.split('://', 1)
  parent = rest.rstrip('/').rpartition('/')[0]
  return f'{scheme}://{parent}'


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """Creates ``path`` and its parents (nothing when it exists)."""
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names in a folder (an object store's sub-prefixes without their trailing ``/``)."""
  if not is_remote(path):
    return os.listdir(path)
  if path.startswith('ram://'):
    # TensorFlow's in-memory store (tests) lists every name that merely starts with the path
    # (``ram://c/7`` lists ``.corrupt`` of ``ram://c/7.corrupt``); its glob does not.
    return sorted(p.rstrip('/').rpartition('/')[2] for p in _gfile().glob(join(path, '*')))
  return [name.rstrip('/') for name in _gfile().listdir(path)]


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    if not _gfile().exists(path):
      raise FileNotFoundError(f'{path} not found.')
    with _gfile().GFile(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


@contextlib.contextmanager
def staged_path(path: str) -> Iterator[str]:
  """A local temporary path beside ``path`` (in a hidden folder of its own) to write a file or a
  folder to, by any writer that takes a path; moved to ``path`` when the ``with`` block ends
  without an error (a folder there is replaced whole), removed otherwise, leaving ``path`` as it
  was. Parent folders are created."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix='.mixer_vit-', dir=parent)
  try:
    target = os.path.join(scratch, os.path.basename(os.path.abspath(path)))
    yield target
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    os.replace(target, path)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def atomic_writer(path: str) -> Iterator[BinaryIO]:
  """A binary file whose content replaces ``path`` only once the ``with`` block ends without an
  error: locally through ``staged_path``; on a URL one object write of what was written (see the
  module docstring). On an error ``path`` is left as it was."""
  if not is_remote(path):
    with staged_path(path) as target, open(target, 'wb') as f:
      yield f
    return
  buffer = io.BytesIO()
  yield buffer
  if path.startswith('ram://') and _gfile().exists(path):
    # TensorFlow's in-memory store (tests) appends to a file opened with 'wb' (TF 2.21); an
    # object store's write replaces the object whole.
    _gfile().remove(path)
  with _gfile().GFile(path, 'wb') as f:
    f.write(buffer.getvalue())


def write_bytes(path: str, data: bytes) -> None:
  """Replaces ``path`` with ``data`` atomically where the store allows (``atomic_writer``)."""
  with atomic_writer(path) as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def open_append(path: str):
  """A text file opened for appending (created when missing). On an object store each flush
  uploads the whole object again (``tf.io.gfile``'s append), fine for the small JSONL files."""
  if is_remote(path):
    return _gfile().GFile(path, 'a')
  return open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with


def append_text(path: str, text: str) -> None:
  with open_append(path) as f:
    f.write(text)


def remove(path: str) -> None:
  if is_remote(path):
    _gfile().remove(path)
  else:
    os.remove(path)


def move_tree(source: str, target: str) -> None:
  """Moves a folder: ``os.rename`` locally (atomic); on an object store every object is copied
  to ``target`` and then the originals deleted (not atomic: see the module docstring)."""
  if not is_remote(source):
    os.rename(source, target)
    return
  gfile = _gfile()
  folders, files = [], []

  def collect(folder: str, relative: str) -> None:
    folders.append((folder, relative))
    for name in listdir(folder):
      child = join(folder, name)
      inner = f'{relative}/{name}' if relative else name
      if gfile.isdir(child):
        collect(child, inner)
      else:
        files.append((child, inner))

  collect(source, '')
  for _, relative in folders:
    gfile.makedirs(join(target, relative) if relative else target)
  for path, relative in files:
    gfile.copy(path, join(target, relative), overwrite=False)
  for path, _ in files:
    gfile.remove(path)
  for folder, _ in reversed(folders):  # Deepest first. A store may have no object for a folder.
    if gfile.exists(folder):
      gfile.remove(folder)


def disk_full_reason(error: BaseException) -> str | None:
  """One line naming the file when ``error`` (or an error it came from, e.g. inside Orbax) is a
  full disk or quota; else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return f'{error.strerror}: {error.filename}' if error.filename else str(error.strerror)
    text = str(error)
    if 'No space left on device' in text:  # Orbax / TensorStore: the last file it names.
      named = re.findall(r'"([^"]+)"', text.split('No space left on device')[0])
      return f'No space left on device: {named[-1]}' if named else 'No space left on device'
    error = error.__cause__ or error.__context__
  return None
