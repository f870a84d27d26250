"""One writer per workdir: an fcntl lock locally, a lease on object stores."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any
import uuid

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from mixer_vit.runtime import paths
from mixer_vit.workdir.files import LOCK_FILE
from mixer_vit.workdir.files import WorkdirBusyError
from mixer_vit.workdir.files import WorkdirError


class WorkdirLock:
  """An exclusive ``fcntl.flock`` on ``WORKDIR/train.lock`` (``train.lock.<i>`` for process i > 0
  of a multi-process run, whose processes share the workdir), holding the holder's host and PID.

  The OS drops the lock when the process ends, however it ends: a leftover file blocks nothing.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    name = LOCK_FILE if process_index == 0 else f'{LOCK_FILE}.{process_index}'
    self.path = os.path.join(workdir, name)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirBusyError naming the holder (the file then unchanged)."""
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # Read-only, not ours, no space: nothing was written.
      raise WorkdirError(
        f'cannot write in --workdir={os.path.dirname(self.path)} ({e.strerror}: {e.filename}); '
        'give a folder you can write to.'
      ) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 4096).decode('utf-8', 'replace').strip()
      os.close(fd)
      try:
        h = json.loads(holder)
        who = f'PID {h["pid"]} on {h["host"]} (since {h["since"]})'
      except (ValueError, KeyError, TypeError):
        who = 'another process (it has not written its host and PID yet)'
      workdir = os.path.dirname(self.path)
      raise WorkdirBusyError(
        f'{workdir} is in use by another training run: {who} holds {self.path}. Wait for it to '
        'end or stop it, or use another --workdir. (Reading the workdir, e.g. with '
        'mixer_vit.infer or mixer_vit.evaluate, needs no lock.)'
      ) from None
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    holder = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': since})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder + '\n').encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# The lease of a workdir on an object store (LeaseLock): renewed every LEASE_RENEW_S by the run
# that holds it, stale (and then taken over by the next run) once LEASE_TIMEOUT_S old. After
# writing its lease a run waits LEASE_SETTLE_S and reads it back: a run that started at the same
# moment and wrote last wins, the other stops.
LEASE_TIMEOUT_S = 600.0
LEASE_RENEW_S = 60.0
LEASE_SETTLE_S = 2.0
_HELD_LEASES: set[str] = set()  # Tokens of the leases this process holds now.


def _pid_alive(pid: int) -> bool:
  """Whether process ``pid`` of this host runs (signal 0 only checks)."""
  if pid <= 0:  # Not a process (0 and -1 would address groups).
    return False
  try:
    os.kill(pid, 0)
  except (ProcessLookupError, OverflowError):
    return False
  except PermissionError:  # It runs, as another user.
    return True
  return True


class LeaseLock:
  """One writer on a workdir where ``fcntl`` cannot work (``gs://``, any URL): a lease file
  ``WORKDIR/train.lock`` (``train.lock.<i>`` for process i > 0) holding the holder's host, PID,
  start time and the time it was last renewed, rewritten every ``renew_s`` by a thread.

  A run refuses to start while the lease of another run is fresh (renewed less than
  ``timeout_s`` ago); it takes over a stale one (the holder died without removing it), with a
  warning naming it, and at once one left by a process of this host that no longer runs. The
  lease is advisory: two runs launched within the same second or two may both find no lease;
  each reads its lease back after ``settle_s`` and the one that wrote first stops, but an object
  store gives no compare-and-swap through ``tf.io.gfile``, so this narrows the window without
  closing it.
  """

  def __init__(
    self,
    workdir: str,
    process_index: int = 0,
    timeout_s: float | None = None,
    renew_s: float | None = None,
    settle_s: float | None = None,
  ):
    name = LOCK_FILE if process_index == 0 else f'{LOCK_FILE}.{process_index}'
    self.path = paths.join(workdir, name)
    self.timeout_s = LEASE_TIMEOUT_S if timeout_s is None else timeout_s
    self.renew_s = LEASE_RENEW_S if renew_s is None else renew_s
    self.settle_s = LEASE_SETTLE_S if settle_s is None else settle_s
    self.lost = False  # Set when another run overwrote the lease while this one held it.
    self._token = uuid.uuid4().hex
    self._since = ''
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def read(self) -> dict[str, Any] | None:
    """The lease in the file (None when there is none)."""
    if not paths.exists(self.path):
      return None
    text = paths.read_text(self.path)
    try:
      holder = json.loads(text)
      float(holder['renewed'])
      return holder
    except (ValueError, KeyError, TypeError):
      raise WorkdirBusyError(
        f'{self.path} is not a lease this project wrote ({text[:200]!r}); if no training run '
        f'uses {paths.dirname(self.path)}, delete it (gsutil rm {self.path}) and run again.'
      ) from None

  def _write(self) -> None:
    now = time.time()
    lease = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'since': self._since,
      'renewed': now,
      'renewed_at': datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(
        timespec='seconds'
      ),
      'timeout_s': self.timeout_s,
      'token': self._token,
    }
    paths.write_text(self.path, json.dumps(lease) + '\n')

  def _who(self, holder: dict[str, Any]) -> str:
    return (
      f'PID {holder.get("pid")} on {holder.get("host")} (since {holder.get("since")}, last '
      f'renewed {holder.get("renewed_at")})'
    )

  def acquire(self) -> None:
    """Takes the lease, or raises WorkdirBusyError naming the holder and the file (unchanged)."""
    paths.makedirs(paths.dirname(self.path))
    holder = self.read()
    if holder is not None:
      age = time.time() - float(holder['renewed'])
      here = holder.get('host') == socket.gethostname()
      pid = int(holder.get('pid', -1))
      if here and pid == os.getpid():
        gone = holder.get('token') not in _HELD_LEASES  # Left by an earlier run of this process.
      else:
        gone = here and not _pid_alive(pid)
      if age < self.timeout_s and not gone:
        workdir = paths.dirname(self.path)
        raise WorkdirBusyError(
          f'{workdir} is in use by another training run: {self._who(holder)} holds the lease '
          f'{self.path} ({age:.0f} s ago). Wait for it to end or stop it, or use another '
          f'--workdir. A lease not renewed for {self.timeout_s:.0f} s is stale and the next run '
          f'takes it over; if you are sure no run uses the workdir, delete it now (gsutil rm '
          f'{self.path}). (Reading the workdir, e.g. with mixer_vit.infer, needs no lease.)'
        )
      logging.warning(
        'Taking over the lease %s of %s: %s.',
        self.path,
        self._who(holder),
        'that process no longer runs'
        if gone
        else f'not renewed for {age:.0f} s, longer than the {self.timeout_s:.0f} s after which '
        'a lease is stale',
      )
    self._since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    self._write()
    if self.settle_s:
      time.sleep(self.settle_s)
    holder = self.read()
    if holder is None or holder.get('token') != self._token:
      raise WorkdirBusyError(
        f'{paths.dirname(self.path)} is in use by another training run: it wrote the lease '
        f'{self.path} at the same time as this one'
        + (f' ({self._who(holder)})' if holder else '')
        + '. Use another --workdir, or wait for that run to end.'
      )
    _HELD_LEASES.add(self._token)
    self._stop.clear()
    self._thread = threading.Thread(target=self._renew, name='mixer_vit-lease', daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.renew_s):
      try:
        holder = self.read()
        if holder is None or holder.get('token') != self._token:
          self.lost = True
          logging.error(
            'The lease %s of this run was %s: another run may now write to the same workdir. '
            'Stop one of them.',
            self.path,
            f'taken by {self._who(holder)}' if holder else 'deleted',
          )
          return
        self._write()
      except Exception as e:  # noqa: BLE001  A failed renewal is retried; training goes on.
        logging.warning('Could not renew the lease %s (%s); trying again.', self.path, e)

  def release(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    _HELD_LEASES.discard(self._token)
    try:
      holder = self.read()
      if holder is not None and holder.get('token') == self._token:
        paths.remove(self.path)
    except Exception as e:  # noqa: BLE001  It goes stale by itself.
      logging.warning('Could not remove the lease %s (%s); it goes stale by itself.', self.path, e)

  def __enter__(self) -> LeaseLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def make_lock(workdir: str, process_index: int = 0) -> WorkdirLock | LeaseLock:
  """The lock of ``workdir`` for process ``process_index``: an ``fcntl`` lock for a local path,
  a lease file for a URL (object stores have no locks)."""
  if paths.is_remote(workdir):
    return LeaseLock(workdir, process_index)
  return WorkdirLock(workdir, process_index)


def lock_workdir(workdir: str) -> WorkdirLock | LeaseLock:
  """This process's lock (``make_lock``), taken; with several processes, every process of the run
  stops (with the holder's name) when any of them finds its lock taken."""
  lock = make_lock(workdir, jax.process_index())
  error = None
  try:
    lock.acquire()
  except WorkdirBusyError as e:
    error = e
  if jax.process_count() > 1:
    taken = multihost_utils.process_allgather(np.int32(error is None))
    if error is None and not np.all(taken):
      lock.release()
      error = WorkdirBusyError(
        f'{workdir} is in use by another training run (process(es) '
        f'{np.flatnonzero(np.asarray(taken) == 0).tolist()} of this run found their lock files '
        'taken; see their messages).'
      )
  if error is not None:
    raise error
  return lock
