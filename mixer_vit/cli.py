"""What the commands share: one-line argument errors, the checkpoint flags, and the output rules.

Checkpoint flags: ``infer``, ``evaluate``, ``export`` and ``attention`` read a classifier the same
way (``--checkpoint``, ``--model``, ``--labels``, ``--resolution``, ``--pp``, ...):
``add_checkpoint_flags`` defines them once and ``infer.load_from_args`` loads what they name.

Output rules, for every command that writes a path the user names (``export --out``, ``plot
--out``, ``attention --out_dir`` / ``--summary``): a missing path is written; an existing one is
refused unless ``--overwrite`` is given, and even then only mixer_vit's own earlier output is
replaced, told by its content (``SOFTWARE`` in a PNG text chunk, in an ONNX file's metadata, in a
SavedModel folder's facts file), never a file the user made. Outputs are written beside their
path and moved into place when complete, so a failed command leaves the old one as it was.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import os
import struct
import sys
from typing import NoReturn

from mixer_vit import __version__
from mixer_vit.runtime import sizes

# Written into every output (PNG text chunk 'Software', export facts): how an output is known as
# ours. Only the prefix is compared, so outputs of other versions count.
SOFTWARE = f'mixer_vit {__version__}'
_SOFTWARE_PREFIX = 'mixer_vit'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class CommandError(ValueError):
  """An argument, input or output a command refuses; its text is the one line the user sees."""


def one_line(error: BaseException) -> str:
  """An exception as one line: its lines joined, a KeyError's text unquoted."""
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  parts = [p.strip() for p in text.strip().splitlines() if p.strip()]
  return ' '.join(parts) or type(error).__name__


def fail(error: BaseException) -> int:
  """Prints ``error: <one line>`` on stderr; returns the exit status of a refused command (2)."""
  print(f'error: {one_line(error)}', file=sys.stderr)
  return 2


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line (``error: ... (see PROG --help)``), exit status 2."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f'error: {message} (see {self.prog} --help)\n')


# ----------------------------------------------------------------------------------------------
# Flag types: argparse names the flag in the message (``argument --top_k: ...``).


def _whole_number(text: str, minimum: int, rule: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
  if value < minimum:
    raise argparse.ArgumentTypeError(f'{value} must be {rule}')
  return value


def positive_int(text: str) -> int:
  """An int of at least 1 (sizes, counts, batches)."""
  return _whole_number(text, 1, 'at least 1')


def non_negative_int(text: str) -> int:
  """An int of at least 0 (limits where 0 means none)."""
  return _whole_number(text, 0, '0 (no limit) or more')


def resolution(text: str) -> tuple[int, int]:
  """``R`` or ``H,W`` (``HxW``): positive (height, width)."""
  try:
    size = sizes.parse(text)
  except ValueError:
    size = None
  if size is None:
    raise argparse.ArgumentTypeError(f'{text!r} is not R or H,W (e.g. 224 or 384,512)')
  if min(size) < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: height and width must be at least 1')
  return size


# ----------------------------------------------------------------------------------------------
# Checkpoint flags.

_CHECKPOINT_FLAGS = {
  'labels': lambda p: p.add_argument('--labels', help='class names, one per line, in label order'),
  'resolution': lambda p: p.add_argument(
    '--resolution',
    type=resolution,
    help='R or H,W: for .npz checkpoints of non-square grids; a ViT .npz runs at another '
    'resolution with its position embeddings resized',
  ),
  'pp': lambda p: p.add_argument('--pp', help='preprocessing string replacing the default'),
  'dtype': lambda p: p.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None),
  'activation': lambda p: p.add_argument(
    '--activation', choices=('softmax', 'sigmoid'), default=None
  ),
  'ema': lambda p: p.add_argument(
    '--ema',
    action='store_true',
    help="the run's EMA parameters (config.ema_decay): its checkpoint's, or params_ema.npz "
    'beside its params.npz',
  ),
  'max_image_pixels': lambda p: p.add_argument(
    '--max_image_pixels',
    type=non_negative_int,
    default=None,
    help='refuse images with more decoded pixels (height x width) than this, before decoding '
    '(default 8000 x 8000; 0: no limit)',
  ),
}
CHECKPOINT_FLAGS = tuple(_CHECKPOINT_FLAGS)


def add_checkpoint_flags(
  parser: argparse.ArgumentParser, *optional: str, required: bool = True
) -> None:
  """``--checkpoint`` and ``--model``, and the ``optional`` ones of ``CHECKPOINT_FLAGS`` (by
  name, e.g. ``'labels', 'resolution'``), as ``infer.load_from_args`` reads them. ``required``:
  whether the parser itself demands ``--checkpoint`` (False when a mode of the command works
  without one and the command checks it)."""
  unknown = [name for name in optional if name not in _CHECKPOINT_FLAGS]
  if unknown:
    raise ValueError(f'unknown checkpoint flags {unknown}; known: {", ".join(CHECKPOINT_FLAGS)}')
  parser.add_argument('--checkpoint', required=required, help='training workdir or .npz file')
  parser.add_argument('--model', help='model name (required for .npz), e.g. ViT-B_16')
  for name in optional:
    _CHECKPOINT_FLAGS[name](parser)


# ----------------------------------------------------------------------------------------------
# Outputs.


def png_is_ours(path: str) -> bool:
  """Whether ``path`` is a PNG file with a ``Software: mixer_vit ...`` text chunk."""
  try:
    with open(path, 'rb') as f:
      if f.read(8) != PNG_SIGNATURE:
        return False
      while True:
        head = f.read(8)
        if len(head) < 8:
          return False
        length, kind = struct.unpack('>I4s', head)
        if kind == b'tEXt' and length <= 4096:
          key, _, value = f.read(length).partition(b'\0')
          if key == b'Software' and value.startswith(_SOFTWARE_PREFIX.encode()):
            return True
          f.seek(4, os.SEEK_CUR)  # CRC
        elif kind == b'IEND':
          return False
        else:
          f.seek(length + 4, os.SEEK_CUR)
  except OSError:
    return False


def is_ours(software: object) -> bool:
  """Whether a recorded ``software`` value (a facts file's, a metadata entry's) is ours."""
  return isinstance(software, str) and software.startswith(_SOFTWARE_PREFIX)


def check_output(
  path: str,
  flag: str,
  *,
  overwrite: bool,
  ours: Callable[[str], bool],
  what: str = 'file',
  example: str = 'NAME',
) -> None:
  """Refuses (CommandError, one line) to write ``path`` when that would replace a user's file.

  Args:
    path: where the command will write.
    flag: the flag that named it, for the message (e.g. ``--out``).
    overwrite: the command's ``--overwrite``.
    ours: tells from the content whether an existing ``path`` is an earlier output of ours.
    what: ``'file'`` or ``'folder'``: what the command writes there.
    example: a file name for the message when ``path`` is a folder but a file is written.
  """
  if not path:
    raise CommandError(f'{flag} is empty; name the {what} to write')
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise CommandError(f'{flag}={path}: {parent} is a file, not a folder; choose another {flag}')
  if not os.path.lexists(path):
    return
  if os.path.islink(path):
    raise CommandError(f'{flag}={path} is a link; name a new {what} (links are not replaced)')
  if what == 'file' and os.path.isdir(path):
    raise CommandError(
      f'{flag}={path} is a folder; name a file to write, e.g. {flag}={os.path.join(path, example)}'
    )
  if what == 'folder' and not os.path.isdir(path):
    raise CommandError(f'{flag}={path} is a file; name a folder to write')
  if not ours(path):
    raise CommandError(
      f'{flag}={path} exists and was not written by mixer_vit; it is never replaced (not even '
      f'with --overwrite): choose another {flag} or move it away yourself'
    )
  if not overwrite:
    raise CommandError(
      f'{flag}={path} already exists (an earlier output); pass --overwrite to replace it'
    )
