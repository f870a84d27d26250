"""Reading the project's environment variables: one spelling of true and false for all of them.

``MIXER_VIT_TCMALLOC``, ``MIXER_VIT_CPU_BFLOAT16`` and ``MIXER_VIT_MULTIHOST`` are on/off switches
read with ``flag``. Imports nothing heavy: the tcmalloc restart reads it before JAX is imported.
"""

from __future__ import annotations

import os

_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('0', 'false', 'no', 'off')


def flag(name: str, default: bool | None) -> bool | None:
  """The on/off value of environment variable ``name``: ``default`` when unset or empty.

  ``1/true/yes/on`` and ``0/false/no/off`` (any case) are accepted; anything else is an error that
  names the variable.
  """
  value = os.environ.get(name, '').strip().lower()
  if not value:
    return default
  if value in _TRUE:
    return True
  if value in _FALSE:
    return False
  raise ValueError(
    f'environment variable {name}={os.environ[name]!r} is not an on/off value; set it to 1 or 0 '
    '(or unset it for the default).'
  )
