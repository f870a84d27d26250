"""Where training numbers go: TensorBoard and ``metrics.jsonl`` in the workdir, and the console.

``metrics.jsonl`` holds one JSON object per write, ``{"step": S, "name": value, ...}``, so scripts
can read a run's history without TensorBoard. A resumed run first drops what was logged after
the step it resumes from (``discard_after``, in both), so every step has one row, from the run
that produced the final parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
import tempfile
import time
from typing import Any

from absl import logging
from clu import metric_writers
import numpy as np
from tensorboard.compat.proto import event_pb2
import tensorflow as tf

from mixer_vit import workdir as workdir_lib
from mixer_vit.runtime import paths


class JsonlWriter(metric_writers.MetricWriter):
  """Appends each ``write_scalars`` call as one JSON line; other kinds of summary are ignored."""

  def __init__(self, path: str):
    self._path = path
    self._file = paths.open_append(path)  # On an object store each flush uploads the file.
    self._closed = False

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step)}
    row.update({k: _plain(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    if not self._closed:
      self._closed = True
      self._file.close()


def _plain(value: Any) -> Any:
  """A JSON-serialisable Python number (NaN and inf are written as JSON's NaN/Infinity)."""
  value = np.asarray(value)
  if value.dtype.kind in 'iu':
    return int(value)
  if value.dtype.kind == 'b':
    return bool(value)
  return float(value)


def make_writer(workdir: str, is_primary: bool = True) -> metric_writers.MetricWriter:
  """TensorBoard events and ``metrics.jsonl`` in ``workdir`` (only the primary process writes)."""
  if not is_primary:
    return metric_writers.MultiWriter([])
  paths.makedirs(workdir)
  return metric_writers.MultiWriter(
    [
      metric_writers.SummaryWriter(workdir),  # TensorFlow's file systems: gs:// too.
      JsonlWriter(paths.join(workdir, workdir_lib.METRICS_FILE)),
    ]
  )


# Values of the evaluation a finished run repeats when launched again (train.run_eval); other
# evaluations at that step (e.g. few-shot probes) are not repeated, so they stay.
EVAL_PREFIXES = ('test_',)


def _is_evaluation(names) -> bool:
  return any(n.startswith(EVAL_PREFIXES) for n in names)


def _drop(step: int, names, after: int, evals_at: int | None) -> bool:
  return step > after or (step == evals_at and _is_evaluation(names))


def _rewrite(path: str, keep_records: list[bytes] | list[str], binary: bool) -> None:
  """Replaces ``path`` atomically: locally a temporary file, renamed (its name has no 'tfevents'
  so that TensorBoard never reads it); on an object store one object write of the new content."""
  if paths.is_remote(path):
    if binary:  # TFRecord framing (lengths, checksums) by TensorFlow, in a local scratch file.
      with tempfile.TemporaryDirectory() as scratch:
        local = os.path.join(scratch, 'records')
        with tf.io.TFRecordWriter(local) as w:
          for record in keep_records:
            w.write(record)
        with open(local, 'rb') as f:
          paths.write_bytes(path, f.read())
    else:
      paths.write_text(path, ''.join(keep_records))
    return
  tmp = os.path.join(os.path.dirname(path), f'.discard-{os.getpid()}.tmp')
  if binary:
    with tf.io.TFRecordWriter(tmp) as w:
      for record in keep_records:
        w.write(record)
  else:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(keep_records)
  os.replace(tmp, path)


def _discard_jsonl(path: str, after: int, evals_at: int | None) -> int:
  if not paths.exists(path):
    return 0
  lines = paths.read_text(path).splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue  # A row cut short by a crash.
    if not line.endswith('\n'):
      continue  # The last row, cut short by a crash.
    if (
      not isinstance(row, dict) or 'step' not in row or not _drop(row['step'], row, after, evals_at)
    ):
      kept.append(line)
  if len(kept) < len(lines):
    _rewrite(path, kept, binary=False)
  return len(lines) - len(kept)


def _discard_events(path: str, after: int, evals_at: int | None) -> int:
  records, dropped = [], 0
  try:
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      event = event_pb2.Event.FromString(record)
      if _drop(event.step, [v.tag for v in event.summary.value], after, evals_at):
        dropped += 1
      else:
        records.append(record)
  except tf.errors.DataLossError:  # A record cut short by a crash.
    dropped += 1
  if dropped:
    _rewrite(path, records, binary=True)
  return dropped


def discard_after(workdir: str, step: int, evaluations_at_step: bool = False) -> None:
  """Removes what ``metrics.jsonl`` and the TensorBoard event files hold past ``step`` (and the
  evaluations at ``step`` itself with ``evaluations_at_step``, which a run repeats), each file
  replaced atomically; rows cut short by a crash go too. For a run resuming from ``step``."""
  evals_at = step if evaluations_at_step else None
  dropped = _discard_jsonl(paths.join(workdir, workdir_lib.METRICS_FILE), step, evals_at)
  events = 0
  for name in sorted(paths.listdir(workdir)):
    if 'tfevents' in name:
      events += _discard_events(paths.join(workdir, name), step, evals_at)
  if dropped or events:
    logging.info(
      'Resuming from step %d: removed %d rows of %s and %d TensorBoard events written after '
      'the checkpoint (they are written again) or cut short by a crash.',
      step,
      dropped,
      workdir_lib.METRICS_FILE,
      events,
    )


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All rows of a ``metrics.jsonl`` file, in order."""
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Throughput:
  """Images per second and time left, over training time only (evaluation and checkpointing are
  excluded with ``pause``/``resume``). The first interval includes compilation; later ones not."""

  def __init__(self, batch_size: int, total_steps: int, start_step: int):
    self._batch_size = batch_size
    self._total = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._paused_at: float | None = None
    self._steps_per_s = float('nan')

  def pause(self):
    self._paused_at = time.perf_counter()

  def resume(self):
    if self._paused_at is not None:
      self._last_time += time.perf_counter() - self._paused_at
      self._paused_at = None

  def update(self, step: int) -> dict[str, float]:
    """Rates since the previous ``update``; call when the step's results are ready."""
    now = time.perf_counter()
    steps, seconds = step - self._last_step, now - self._last_time
    if steps > 0 and seconds > 0:
      self._steps_per_s = steps / seconds
    self._last_step, self._last_time = step, now
    eta = (self._total - step) / self._steps_per_s if self._steps_per_s > 0 else float('nan')
    return {'img_per_s': self._steps_per_s * self._batch_size, 'eta_s': eta}


def console_line(step: int, total_steps: int, values: Mapping[str, float]) -> str:
  """One progress line: ``step 100/1000  loss 0.4321  lr 1.0e-03  2500 img/s  ETA 1m12s``."""
  parts = [f'step {step}/{total_steps}']
  if 'loss' in values:
    parts.append(f'loss {values["loss"]:.4f}')
  if 'lr' in values:
    parts.append(f'lr {values["lr"]:.2e}')
  if 'img_per_s' in values and math.isfinite(values['img_per_s']):
    parts.append(f'{values["img_per_s"]:.0f} img/s')
  if 'eta_s' in values:
    parts.append(f'ETA {format_duration(values["eta_s"])}')
  for k, v in values.items():
    if k.startswith('test_'):
      parts.append(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}')
  return '  '.join(parts)


def log(line: str):
  logging.info('%s', line)
