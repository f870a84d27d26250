"""Stopping a training run cleanly: SIGTERM and Ctrl-C (SIGINT) save a checkpoint, then stop.

Single process: SIGTERM or a first Ctrl-C sets a flag that the loop reads after every step
(``Preemption.reached``); it then saves a checkpoint and returns, and the command line exits with
status 0 (SIGTERM) or ``CTRL_C_EXIT_STATUS`` (Ctrl-C). A second Ctrl-C ends the process at once.
Multi-host runs leave SIGTERM to JAX's preemption service: every host stops at the same step.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

_SIGTERM = threading.Event()  # Set by SIGTERM or the first Ctrl-C: save and stop.
_CTRL_C = threading.Event()  # The first Ctrl-C came.
_EXIT_ON_SECOND_CTRL_C = [False]  # The command line: a second Ctrl-C ends the process at once.
CTRL_C_EXIT_STATUS = 130  # The shells' status for a command ended by Ctrl-C (128 + SIGINT).


def _on_sigterm(signum=signal.SIGTERM, _frame=None):
  if signum == signal.SIGINT:
    if _CTRL_C.is_set():
      if _EXIT_ON_SECOND_CTRL_C[0]:
        os.write(2, b'\nSecond Ctrl-C: exiting now, without a checkpoint.\n')
        os._exit(CTRL_C_EXIT_STATUS)
      raise KeyboardInterrupt
    _CTRL_C.set()
    os.write(
      2,
      b'\nCtrl-C: saving a checkpoint at the next step, then stopping (press Ctrl-C again to '
      b'exit at once, losing the steps since the last checkpoint).\n',
    )
  _SIGTERM.set()


def catch_sigterm() -> None:
  """For a command's whole life (single process): SIGTERM, or a first Ctrl-C (SIGINT), stops the
  training at the next step with a checkpoint; one after the last step only lets the run finish
  (it then exits normally). A second Ctrl-C ends the process at once (status 130)."""
  _EXIT_ON_SECOND_CTRL_C[0] = True
  signal.signal(signal.SIGTERM, _on_sigterm)
  signal.signal(signal.SIGINT, _on_sigterm)


def stopped_by_ctrl_c() -> bool:
  """Whether a Ctrl-C (SIGINT) asked the run to stop: the command line then exits with
  ``CTRL_C_EXIT_STATUS`` after saving."""
  return _CTRL_C.is_set()


class Preemption:
  """Tells the loop to save and stop: on SIGTERM or a first Ctrl-C (single process), or at the
  preemption sync point JAX's coordination service sets on every host (multi-host)."""

  def __init__(self):
    self._previous = {}

  def __enter__(self):
    if (
      jax.process_count() == 1
      and threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGTERM) is not _on_sigterm  # Else caught all along.
    ):
      _SIGTERM.clear()
      _CTRL_C.clear()
      for number in (signal.SIGTERM, signal.SIGINT):
        self._previous[number] = signal.signal(number, _on_sigterm)
    return self

  def __exit__(self, *exc):
    for number, previous in self._previous.items():
      signal.signal(number, previous)
    self._previous = {}

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # No preemption service.
        return False
    return _SIGTERM.is_set()
