"""The requirements files agree on jax, and the notebooks' set-up keeps a runtime's accelerator."""

import fnmatch
import pathlib
import re

import pytest

from mixer_vit.runtime import install

REPO = pathlib.Path(__file__).resolve().parents[1]


def _lines(name):
  text = (REPO / name).read_text()
  return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith('#')]


def _jax_lines(name):
  return [line for line in _lines(name) if re.match(r'(jax|jaxlib)(\[|=)', line)]


def test_the_files_differ_only_in_the_jax_line_and_pin_one_version():
  version = install.pinned_jax_version(str(REPO))
  assert _jax_lines(install.COMMON) == []
  assert _jax_lines(install.CPU) == [f'jax=={version}', f'jaxlib=={version}']
  assert _jax_lines(install.GPU) == [f'jax[cuda12]=={version}']
  assert _jax_lines(install.TPU) == [f'jax[tpu]=={version}']
  for name in (install.CPU, install.GPU, install.TPU):
    assert _lines(name)[0] == f'-r {install.COMMON}'
    assert len(_lines(name)) == 1 + len(_jax_lines(name)), f'{name}: other packages go in common'


def _fake(installed=(), which=(), devices=()):
  return {
    'installed': lambda name: dict(installed).get(name),
    'which': lambda name: f'/usr/bin/{name}' if name in which else None,
    'devices': lambda pattern: [p for p in devices if fnmatch.fnmatch(p, pattern)],
  }


@pytest.mark.parametrize(
  'machine, expected',
  [
    ({}, ['-r', 'requirements.txt']),
    ({'installed': [('jax-cuda12-plugin', '0.7.1')]}, ['-r', 'requirements-gpu.txt']),
    (
      {'installed': [('jax-cuda13-plugin', '0.8.0')]},
      ['-r', 'requirements-common.txt', 'jax[cuda13]==VERSION'],
    ),
    ({'installed': [('libtpu', '0.0.17')]}, ['-r', 'requirements-tpu.txt']),
    ({'which': ['nvidia-smi']}, ['-r', 'requirements-gpu.txt']),
    ({'devices': ['/dev/accel0']}, ['-r', 'requirements-tpu.txt']),
  ],
  ids=['cpu', 'colab-gpu', 'cuda13', 'colab-tpu', 'driver-only', 'tpu-vm'],
)
def test_the_set_up_cell_installs_the_runtimes_accelerator_build(machine, expected):
  args, why = install.pip_arguments(str(REPO), **_fake(**machine))
  version = install.pinned_jax_version(str(REPO))
  assert args == [
    str(REPO / a) if a.startswith('requirements') else a.replace('VERSION', version)
    for a in expected
  ]
  assert ' '.join(args) in why
  assert ('CPU build' in why) == (not machine)


def test_a_requirements_file_without_a_jax_pin_is_named(tmp_path):
  (tmp_path / 'requirements.txt').write_text('-r requirements-common.txt\n')
  with pytest.raises(ValueError, match='requirements.txt has no jax==VERSION line'):
    install.pinned_jax_version(str(tmp_path))
