r"""Trains or fine-tunes a ViT or Mixer: the command-line entry point.

  python -m mixer_vit.main --config=configs/digits.py --workdir=workdirs/digits
  python -m mixer_vit.main --config=configs/finetune.py:ViT-B_16,cifar10 \
      --config.pretrained=ViT-B_16.npz --workdir=workdirs/vit_b16_cifar10

Any config value can be overridden with ``--config.KEY=VALUE``; an unknown key is an error.
Running the same command again resumes from the workdir's latest checkpoint; a config that changes
what is trained is refused then (``--config.allow_config_change=True`` accepts it, recorded in the
workdir's config_history.jsonl), and so is a second run on a workdir in use. ``--dry_run`` compiles
the train step for the config's mesh, prints its per-device memory and exits (``mixer_vit.training.memory``). SIGTERM saves a
checkpoint and exits with status 0. A first Ctrl-C (SIGINT) saves one too and exits with status 130
(the shells' status for Ctrl-C, so that a script's loop stops as well); a second Ctrl-C exits at
once (status 130; the steps since the last checkpoint are lost). Errors are one ``error: ...`` message with
status 1. The workdir must be new, empty, or a workdir of this project (``mixer_vit.workdir``): a
folder of other files is refused.

Speed: on Linux the process re-executes itself once with tcmalloc preloaded
(``LD_PRELOAD=libtcmalloc_minimal.so.4``) when that library is installed, which makes XLA on CPU
markedly faster; set ``MIXER_VIT_TCMALLOC=0`` to turn this off.
"""

import logging as std_logging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mixer_vit.runtime import tcmalloc
from mixer_vit.training import config_utils

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Training config file, e.g. configs/digits.py or configs/pretrain.py:'
  'ViT-Ti_16,cifar10; override values with --config.KEY=VALUE.',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  'workdir',
  None,
  'Directory for checkpoints, metrics and the final params.npz; an existing one is resumed.',
)
_DRY_RUN = flags.DEFINE_bool(
  'dry_run',
  False,
  "Compile the config's train step on this machine's devices (config.mesh), print XLA's "
  'per-device memory (parameters + optimiser state, temporaries, total) and exit; nothing is '
  'written to the workdir.',
)
_MULTIHOST = flags.DEFINE_bool(
  'multihost',
  None,
  'Call jax.distributed.initialize() first (one process per host). Default: '
  'on when the environment has MIXER_VIT_MULTIHOST=1.',
)


def _quiet_orbax():
  """Orbax logs every save step by step at INFO; keep its warnings, drop the rest. A full disk
  is one ``error:`` line (``train``), not Orbax's tracebacks of each thread that failed."""

  def keep(record):
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    text = record.getMessage()
    if record.exc_info:
      text += ''.join(traceback.format_exception(*record.exc_info))
    return 'No space left on device' not in text

  logging.get_absl_logger().addFilter(keep)


def _config_file_error(error: flags.Error) -> str | None:
  """The one line of an error raised by the config file's ``get_config`` (e.g. a bad ``:arg``
  value), which ml_collections wraps in its traceback; None for other flag errors."""
  text = str(error)
  if 'Error whilst parsing config file' not in text:
    return None
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  last = lines[-1]
  name, _, message = last.partition(': ')
  if message and name.replace('.', '').isidentifier() and name.endswith(('Error', 'Exception')):
    last = message
  return f'error: {lines[0].split(": Error whilst")[0].removeprefix("flag ")}: {last}'


_MODEL_PREFIXES = ('--config.model.', '-config.model.')


def take_model_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Splits ``--config.model.KEY=VALUE`` (or ``--config.model.KEY VALUE``) off ``argv``: absl
  knows only the keys the config file sets, and a model has many more (``set_model_keys``)."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(_MODEL_PREFIXES):
      key, sep, value = arg.split('config.model.', 1)[1].partition('=')
      if not sep:
        if i + 1 >= len(argv):
          sys.exit(f'error: {arg} has no value; give it as {arg}=VALUE.')
        value, i = argv[i + 1], i + 1
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def parse_flags(argv):
  """absl's parsing, with a clear message for a ``--config.KEY`` the config does not have; then
  the ``--config.model.KEY`` overrides, for any key of the model."""
  original = list(argv)
  argv, model_overrides = take_model_overrides(argv)
  if list(sys.argv) == original:  # ml_collections reads its overrides from sys.argv itself.
    sys.argv[:] = argv
  try:
    rest = _parse_absl(argv)
    if model_overrides and _CONFIG.value is not None:
      config = _CONFIG.value
      config_utils.set_model_keys(config, model_overrides)
      from mixer_vit import models  # noqa: PLC0415  (JAX: after the tcmalloc restart)

      models.get_model_config(config.model_name, **config.model.to_dict())  # Unknown keys.
    return rest
  except ValueError as e:
    sys.exit(f'error: {e}')


def _parse_absl(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    line = _config_file_error(e)
    if line is not None:
      sys.exit(line)
    sys.exit(f'FATAL Flags parsing error: {e}\nPass --help to see help on flags.')
  except (AttributeError, KeyError) as e:  # ml_collections: the key path does not exist.
    overrides = [a for a in argv[1:] if a.startswith(('--config.', '-config.'))]
    reason = e
    while isinstance(reason, BaseException) and reason.args:
      reason = reason.args[0]
    sys.exit(
      f'Unknown config key in {" ".join(overrides)}: {reason}\nEvery --config.KEY must be '
      "a key of the config file's get_config() (see configs/ and "
      'mixer_vit/training/config_utils.py).'
    )


def _config_path_error(value: str) -> str | None:
  """Why ``--config=value`` names no config file (one line), or None."""
  path, sep, arg = value.partition(':')
  if path.endswith('.py') and os.path.isfile(path):
    return None
  if not path:
    return 'error: --config is empty; give a config file, e.g. --config=configs/digits.py.'
  if path.endswith('.py'):
    return (
      f'error: config file {path} not found (--config={value}); give the path of a config '
      'file, e.g. --config=configs/digits.py (run from the project root).'
    )
  if os.path.isdir(path):
    found = sorted(n for n in os.listdir(path) if n.endswith('.py') and not n.startswith('_'))
    example = os.path.join(path, found[0]) if found else 'configs/digits.py'
    return (
      f'error: --config={value}: {path} is a folder; give a config file (.py) in it, e.g. '
      f'--config={example}{sep}{arg}.'
    )
  if os.path.isfile(path + '.py'):
    return (
      f'error: --config={value}: no file {path}; config files end in .py: '
      f'--config={path}.py{sep}{arg}.'
    )
  if os.path.isfile(path):
    return (
      f'error: --config={value}: {path} is not a config file; give a Python file with a '
      'get_config() function, e.g. --config=configs/digits.py.'
    )
  return (
    f'error: config file {path} not found (--config={value}); give the path of a config '
    'file (.py), e.g. --config=configs/digits.py (run from the project root).'
  )


def check_config_file(argv: list[str]) -> None:
  """Exits at once with one line when ``--config`` names no config file: missing, a folder, a
  file that is not ``.py``, a path without its ``.py`` (before the seconds of importing JAX and
  TensorFlow, and absl's long report)."""
  for i, arg in enumerate(argv[1:], 1):
    if arg in ('--config', '-config') and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(('--config=', '-config=')):
      value = arg.split('=', 1)[1]
    else:
      continue
    error = _config_path_error(value)
    if error:
      sys.exit(error)


def _exit(status: int, distributed: bool = False) -> None:
  """Ends the process now: everything is written and closed by then, and the interpreter's own
  shutdown (TensorFlow's and tf.data's threads and modules) takes seconds for nothing."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  if distributed:
    import jax  # noqa: PLC0415  (imported long before by train)

    jax.distributed.shutdown()
  os._exit(status)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}; values go in --config.KEY=VALUE.')
  # Imported here, after the tcmalloc restart: JAX and TensorFlow take seconds to import.
  from mixer_vit import workdir as workdir_lib  # noqa: PLC0415
  from mixer_vit.runtime import parallel  # noqa: PLC0415
  from mixer_vit.training import memory  # noqa: PLC0415
  from mixer_vit.training import stopping  # noqa: PLC0415
  from mixer_vit.training import train  # noqa: PLC0415

  _quiet_orbax()
  parallel.maybe_initialize_distributed(_MULTIHOST.value)
  import jax  # noqa: PLC0415

  distributed = jax.process_count() > 1
  if not distributed and not _DRY_RUN.value:  # Multi-host runs: JAX's preemption service.
    stopping.catch_sigterm()
  logging.info('tcmalloc preloaded: %s', tcmalloc.is_preloaded())
  try:
    if _DRY_RUN.value:
      report = memory.dry_run(_CONFIG.value)
      if jax.process_index() == 0:
        print(report.summary())
      _exit(0, distributed)
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (workdir_lib.WorkdirError, train.NonFiniteLossError, ValueError, OSError) as e:
    logging.debug('%s', traceback.format_exc())  # With --verbosity=1.
    print(f'error: {e}', file=sys.stderr)
    _exit(1)
  logging.info('Finished: %s', result)
  if result['stopped_early'] and stopping.stopped_by_ctrl_c():
    _exit(stopping.CTRL_C_EXIT_STATUS, distributed)
  _exit(0, distributed)


if __name__ == '__main__':
  check_config_file(sys.argv)
  flags.mark_flags_as_required(['config', 'workdir'])
  tcmalloc.maybe_reexec('mixer_vit.main')
  app.run(main, flags_parser=parse_flags)
