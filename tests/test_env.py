"""The environment switches: one spelling of on and off, a clear error for anything else."""

import pytest

from mixer_vit.models import precision
from mixer_vit.runtime import env
from mixer_vit.runtime import tcmalloc


@pytest.mark.parametrize(
  ('value', 'expected'),
  [('1', True), ('true', True), ('Yes', True), ('ON', True), ('0', False), ('False', False)]
  + [('no', False), ('off', False), ('', 'default'), (None, 'default')],
)
def test_flag_values(monkeypatch, value, expected):
  if value is None:
    monkeypatch.delenv('MIXER_VIT_TEST_SWITCH', raising=False)
  else:
    monkeypatch.setenv('MIXER_VIT_TEST_SWITCH', value)
  default = object()
  got = env.flag('MIXER_VIT_TEST_SWITCH', default)
  assert got is (default if expected == 'default' else expected)


def test_flag_refuses_other_values_naming_the_variable(monkeypatch):
  monkeypatch.setenv('MIXER_VIT_TEST_SWITCH', 'maybe')
  with pytest.raises(ValueError, match="MIXER_VIT_TEST_SWITCH='maybe'"):
    env.flag('MIXER_VIT_TEST_SWITCH', True)


def test_switches_read_through_flag(monkeypatch):
  monkeypatch.setenv('MIXER_VIT_TCMALLOC', 'off')
  assert tcmalloc.library_path() is None
  precision.cpu_multiplies_bfloat16.cache_clear()
  try:
    monkeypatch.setenv('MIXER_VIT_CPU_BFLOAT16', 'no')
    assert precision.cpu_multiplies_bfloat16() is False
    precision.cpu_multiplies_bfloat16.cache_clear()
    monkeypatch.setenv('MIXER_VIT_CPU_BFLOAT16', 'yes')
    assert precision.cpu_multiplies_bfloat16() is True
  finally:
    precision.cpu_multiplies_bfloat16.cache_clear()
