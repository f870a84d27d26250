"""Which requirements file fits this machine's accelerator: for the notebooks' set-up cell.

A Colab GPU or TPU runtime comes with a jax build for its accelerator (jaxlib plus a CUDA plugin,
or libtpu). ``pip install -r requirements.txt`` would pin the CPU build over it (jax and jaxlib
only, the plugin left at another version, which jax then refuses), so the accelerator would be
gone. ``pip_arguments`` picks instead the file with the same jax version and the runtime's
accelerator extra: ``requirements-gpu.txt`` (``jax[cuda12]``), ``jax[cuda13]`` on a CUDA 13
runtime, ``requirements-tpu.txt`` (``jax[tpu]``), or ``requirements.txt`` where there is none.

Standard library only: it runs before anything else of the project is installed.
"""

from __future__ import annotations

from collections.abc import Callable
import glob
import importlib.metadata
import os
import re
import shutil

COMMON = 'requirements-common.txt'
CPU = 'requirements.txt'
GPU = 'requirements-gpu.txt'
TPU = 'requirements-tpu.txt'

# Distributions that make a jax installation an accelerator build, and the extra they come from.
ACCELERATOR_DISTRIBUTIONS = (
  ('jax-cuda13-plugin', 'cuda13'),
  ('jax-cuda12-plugin', 'cuda12'),
  ('libtpu', 'tpu'),
  ('libtpu-nightly', 'tpu'),
)


def _installed(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def detect_accelerator(
  installed: Callable[[str], str | None] = _installed,
  which: Callable[[str], str | None] = shutil.which,
  devices: Callable[[str], list[str]] = glob.glob,
) -> tuple[str | None, str]:
  """``(extra, why)``: the jax extra this machine needs (``'cuda12'``, ``'cuda13'``, ``'tpu'``)
  or None for CPU, and a sentence saying how it was found. An installed accelerator build
  (its plugin distribution) decides first; else an NVIDIA driver (``nvidia-smi``) means CUDA 12,
  and TPU device files (``/dev/accel*``, ``/dev/vfio/*``) a TPU."""
  for name, extra in ACCELERATOR_DISTRIBUTIONS:
    version = installed(name)
    if version:
      return extra, f'this runtime has {name} {version} (jax[{extra}])'
  if which('nvidia-smi'):
    return 'cuda12', 'nvidia-smi found (an NVIDIA driver); no jax GPU build installed yet'
  if devices('/dev/accel*') or devices('/dev/vfio/[0-9]*'):
    return 'tpu', 'TPU devices found (/dev/accel* or /dev/vfio); no libtpu installed yet'
  return None, 'no accelerator found'


def pinned_jax_version(repo: str) -> str:
  """The version of the ``jax==`` line of ``requirements.txt``."""
  path = os.path.join(repo, CPU)
  with open(path, encoding='utf-8') as f:
    for line in f:
      match = re.match(r'\s*jax==([\w.]+)\s*$', line)
      if match:
        return match.group(1)
  raise ValueError(f'{path} has no jax==VERSION line; restore it from the repository.')


def pip_arguments(repo: str, **detect_kwargs) -> tuple[list[str], str]:
  """``(arguments for pip install, why)``: the requirements of the checkout at ``repo`` with the
  jax build of this machine's accelerator (see the module docstring)."""
  extra, why = detect_accelerator(**detect_kwargs)
  if extra is None:
    files = ['-r', os.path.join(repo, CPU)]
  elif extra == 'cuda12':
    files = ['-r', os.path.join(repo, GPU)]
  elif extra == 'tpu':
    files = ['-r', os.path.join(repo, TPU)]
  else:  # The same version with another extra than the files name.
    files = ['-r', os.path.join(repo, COMMON), f'jax[{extra}]=={pinned_jax_version(repo)}']
  target = f'jax[{extra}]' if extra else 'the CPU build of jax'
  return files, f'{why}: installing {target} and the other requirements ({" ".join(files)}).'
