"""Image sizes as ``(height, width)`` pairs: from an int, a pair, or command-line text.

The one place that turns ``224``, ``(384, 512)`` or ``'384,512'`` into ``(H, W)``, so models,
preprocessing ops and the command-line tools accept the same spellings.
"""

from __future__ import annotations

import collections.abc
import re
from typing import Any


def pair(value: Any, name: str = 'size') -> tuple[int, int]:
  """``224`` -> ``(224, 224)``; ``(384, 512)`` -> ``(384, 512)``; anything else is an error."""
  if isinstance(value, int) and not isinstance(value, bool):
    return value, value
  if (
    isinstance(value, collections.abc.Sequence)
    and not isinstance(value, str)
    and len(value) == 2
    and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
  ):
    return int(value[0]), int(value[1])
  raise ValueError(f'{name} must be an int or a pair of ints (height, width), got {value!r}.')


def parse(text: str | None, name: str = '--resolution') -> tuple[int, int] | None:
  """Command-line text ``'224'``, ``'384,512'``, ``'384x512'`` -> ``(H, W)``; None when empty."""
  if text is None or not str(text).strip():
    return None
  try:
    parts = [int(p) for p in re.split(r'[,x ]+', str(text).strip()) if p]
  except ValueError:
    parts = []
  if len(parts) == 1:
    return parts[0], parts[0]
  if len(parts) == 2:
    return parts[0], parts[1]
  raise ValueError(f'{name} must be R or H,W (e.g. 224 or 384,512); got {text!r}.')
