r"""Throughput benchmark: compile time, images/s, and achieved FLOP/s against a measured peak.

  python -m mixer_vit.benchmark --model=ViT-B_16 [--batch=32] [--train] [--dtype=bfloat16] \
      [--mixed] [--resolution=224] [--runs=10] [--warmup=2] [--fsdp=1] [--remat[=POLICY]] [--json]
  python -m mixer_vit.benchmark --model=ViT-g_14 --train --memory --fsdp=8 --remat --batch=8
  python -m mixer_vit.benchmark --model=ViT-B_16 --train --batch=256 --dtype=bfloat16 \
      --attention_impl=xla   # against the default 'auto' (padded cuDNN on a CUDA GPU)

``--mixed`` times the model twice in one process, in float32 and in mixed precision
(``config.matmul_dtype='bfloat16'``: bfloat16 multiplies, float32 sums and everything else), and
prints both and their ratio; each is measured against the matmul peak of its own operand dtype.

``--memory`` only compiles the training step (on abstract inputs: nothing allocated, nothing run)
and prints XLA's per-device bytes for it (``mixer_vit.training.memory``); ``--fsdp=N`` shards the state
over N devices of the mesh (``config.mesh.fsdp``), ``--remat[=POLICY]`` rematerialises the blocks
(``model.remat``, ``model.remat_policy``), ``--scan`` builds the layers as one ``nn.scan``.

What is measured, in one process:
- compile time: ``jit(step).lower(...).compile()`` wall time;
- step time: median over ``--runs`` timed calls after ``--warmup`` untimed ones, each call waited
  for with ``block_until_ready``; images/s = batch / median step time;
- FLOPs per step: XLA's own count for the compiled step (``compiled.cost_analysis()['flops']``);
  the analytic count of the model's matrix multiplies and convolutions (``models.flops``) is
  printed beside it as a check;
- matmul peak: the median FLOP/s of a large square ``jnp.dot`` in the same dtype on the same
  devices, measured in the same run; the model's achieved FLOP/s is reported as a share of it
  (MFU), on any backend (on a GPU the 8192^2 product reaches its dense bfloat16 rate), once with
  XLA's count and once with the analytic one (which XLA's misses where a kernel is a custom call,
  e.g. cuDNN's flash attention).

The command builds the trainer's model, state and step (``mixer_vit.training.run_setup``) on random data:
it needs no data pipeline and imports no TensorFlow, so it runs on a GPU machine without it.

``--train`` times the trainer's real training step (forward, backward, optimiser update) on
random data; without it, the evaluation forward pass.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import json
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit import models
from mixer_vit.models import flops
from mixer_vit.models import vit
from mixer_vit.runtime import parallel
from mixer_vit.runtime import sizes
from mixer_vit.runtime import tcmalloc
from mixer_vit.training import config_utils
from mixer_vit.training import memory
from mixer_vit.training import run_setup
from mixer_vit.training import steps

# ----------------------------------------------------------------------------------------------
# Timing and FLOP counting.


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 1) -> list[float]:
  """Wall-clock seconds of ``runs`` calls of ``fn`` (results waited for), after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def xla_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled function, as XLA's cost analysis counts them (None if absent).

  Note: XLA counts a loop body once, so a model built with ``scan=True`` is under-counted; the
  benchmark builds models without scan for that reason.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return None
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per device program.
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  count = float(analysis['flops'])
  return count if count > 0 else None


def default_matmul_size() -> int:
  """A square size that keeps the matrix unit busy: large on accelerators, moderate on CPU."""
  return 2048 if jax.default_backend() == 'cpu' else 8192


def matmul_peak(
  dtype: Any = jnp.float32, size: int | None = None, runs: int = 5, warmup: int = 2
) -> dict[str, float]:
  """Measured FLOP/s of a large ``jnp.dot`` (size x size by size x size) in ``dtype``.

  Uses the default device (the same one the model runs on in a single-device benchmark).
  Returns ``{'size', 'seconds', 'flops_per_second'}`` with the median time of ``runs`` calls.
  """
  size = size or default_matmul_size()
  keys = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(keys[0], (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(keys[1], (size, size), jnp.float32).astype(dtype)
  # Accumulate in float32 as the models do (preferred_element_type), output in ``dtype``.
  dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype))
  seconds = statistics.median(time_calls(lambda: dot(a, b), runs, warmup))
  return {'size': size, 'seconds': seconds, 'flops_per_second': 2.0 * size**3 / seconds}


def analytic_flops(
  model_config: Any, image_hw: tuple[int, int], batch: int, train: bool = False
) -> float | None:
  """FLOPs (2 x multiply-adds) of the matrix products and convolutions of `batch` images, counted
  by hand (`models.flops`): ViT, hybrid, Mixer and ResNet; None for other families. Training is
  counted as 3x the forward pass (backward = 2x forward), the usual rule."""
  per_image = flops.forward_flops(model_config, image_hw)
  if per_image is None:
    return None
  total = per_image * batch
  return 3.0 * total if train else total


# ----------------------------------------------------------------------------------------------
# Result.


@dataclasses.dataclass
class BenchmarkResult:
  model: str
  mode: str  # 'train' or 'inference'
  batch: int
  resolution: tuple[int, int]
  dtype: str
  backend: str
  devices: int
  compile_seconds: float
  step_seconds_median: float
  step_seconds_all: list[float]
  images_per_second: float
  flops_per_step: float | None
  flops_source: str
  analytic_flops_per_step: float | None
  achieved_flops_per_second: float | None
  matmul_peak_flops_per_second: float
  matmul_size: int
  share_of_peak: float | None
  matmul_peak_before_after: tuple[float, float] = (0.0, 0.0)
  matmul_dtype: str | None = None  # Mixed precision: the multiplies' operand dtype.
  analytic_share_of_peak: float | None = None  # MFU from the analytic FLOP count.

  @property
  def precision(self) -> str:
    if self.matmul_dtype:
      return f'mixed precision ({self.matmul_dtype} multiplies, {self.dtype} elsewhere)'
    return self.dtype

  def summary(self) -> str:
    def tf(x):
      return (
        'n/a' if x is None else f'{x / 1e12:.3f} TFLOP/s' if x >= 1e11 else f'{x / 1e9:.2f} GFLOP/s'
      )

    def gf(x):
      return 'n/a' if x is None else f'{x / 1e9:.2f} GFLOP'

    lines = [
      f'{self.model} {self.mode}, batch {self.batch}, {self.resolution[0]}x{self.resolution[1]}, '
      f'{self.precision}, {self.devices} {self.backend} device(s)',
      f'  compile time:     {self.compile_seconds:.2f} s',
      f'  step time:        {self.step_seconds_median * 1e3:.1f} ms (median of '
      f'{len(self.step_seconds_all)} runs; min {min(self.step_seconds_all) * 1e3:.1f}, max '
      f'{max(self.step_seconds_all) * 1e3:.1f})',
      f'  throughput:       {self.images_per_second:.1f} images/s',
      f'  FLOPs per step:   {gf(self.flops_per_step)} ({self.flops_source}); analytic '
      f'matmul count {gf(self.analytic_flops_per_step)}',
      f'  achieved:         {tf(self.achieved_flops_per_second)}',
      f'  matmul peak:      {tf(self.matmul_peak_flops_per_second)} ({self.matmul_size}^2 '
      f'jnp.dot, {self.matmul_dtype or self.dtype}; the better of the medians before ('
      f'{tf(self.matmul_peak_before_after[0])}) and after ('
      f"{tf(self.matmul_peak_before_after[1])}) the model's runs)",
      '  MFU:              '
      + ('n/a' if self.share_of_peak is None else f'{100 * self.share_of_peak:.1f} %')
      + ' of the measured matmul peak; '
      + (
        'n/a'
        if self.analytic_share_of_peak is None
        else f'{100 * self.analytic_share_of_peak:.1f} %'
      )
      + ' from the analytic count',
    ]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# The model's step.


def _random_batch(rng: np.random.Generator, batch: int, hw: tuple[int, int], num_classes: int):
  images = rng.uniform(-1, 1, size=(batch, *hw, 3)).astype(np.float32)
  labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, size=batch)]
  return {'image': images, 'labels': labels}


def _train_config(
  model: str,
  batch: int,
  dtype: str,
  overrides: dict[str, Any],
  fsdp: int = 1,
  matmul_dtype: str | None = None,
):
  config = config_utils.base_config()
  config.model_name = model
  config.batch_size = batch
  config.dtype = dtype
  config.matmul_dtype = matmul_dtype
  config.total_steps = 10_000
  config.warmup_steps = 100
  config.mesh.fsdp = fsdp
  with config.unlocked():
    config.model = dict(overrides)
  return config


def benchmark(
  model: str,
  batch: int = 32,
  train: bool = False,
  dtype: str = 'float32',
  resolution: tuple[int, int] | None = None,
  num_classes: int = 1000,
  runs: int = 10,
  warmup: int = 2,
  matmul_size: int | None = None,
  matmul_runs: int = 5,
  overrides: dict[str, Any] | None = None,
  mesh: Any = None,
  fsdp: int = 1,
  matmul_dtype: str | None = None,
) -> BenchmarkResult:
  """Compiles and times one step of ``model`` on random data; see the module docstring.

  ``train=True`` times ``steps.make_train_step`` (the trainer's jitted step, AdamW as in the
  default config); otherwise the jitted ``model.apply(..., train=False)``.
  """
  # Unrolled layers: XLA's cost analysis counts a scanned loop body only once.
  overrides = {'scan': False, **(overrides or {})}
  config = _train_config(model, batch, dtype, overrides, fsdp, matmul_dtype)
  hw = tuple(resolution or _model_config(config, num_classes).image_size)
  mesh = mesh or parallel.mesh_from_config(config)
  run_setup.RunSettings.from_config(config).check_batch(mesh.size, flag='--batch')
  setup = run_setup.make(config, num_classes, (*hw, 3), mesh)  # The trainer's set-up.
  mesh, model_config, module = setup.mesh, setup.model_config, setup.model
  rng = np.random.default_rng(0)
  host_batch = _random_batch(rng, batch, hw, num_classes)
  batch_arrays = parallel.shard_batch(host_batch, mesh)
  repl = parallel.replicated(mesh)

  if train:
    state = setup.init_state(jax.random.PRNGKey(0))
    step = setup.train_step()
    key = jax.random.PRNGKey(1)
    start = time.perf_counter()
    compiled = step.lower(state, batch_arrays, key).compile()
    compile_seconds = time.perf_counter() - start
    holder = {'state': state}

    def call():
      holder['state'], metrics = compiled(holder['state'], batch_arrays, key)
      return metrics['loss']
  else:
    params = jax.jit(lambda k: setup.init(k).params, out_shardings=repl)(jax.random.PRNGKey(0))
    forward = jax.jit(
      lambda p, x: module.apply({'params': p}, x, train=False),
      in_shardings=(repl, parallel.batch_sharding(mesh)),
    )
    start = time.perf_counter()
    compiled = forward.lower(params, batch_arrays['image']).compile()
    compile_seconds = time.perf_counter() - start

    def call():
      return compiled(params, batch_arrays['image'])

  # The peak before and after the model's runs: the machine may be shared, so the better of the
  # two is the one the model could have reached.
  peak_dtype = jnp.dtype(matmul_dtype or dtype)
  peak_before = matmul_peak(peak_dtype, matmul_size, matmul_runs)
  times = time_calls(call, runs, warmup)
  median = statistics.median(times)
  step_flops = xla_flops(compiled)
  source = 'XLA cost analysis of the compiled step'
  if step_flops is not None and mesh.size > 1:
    step_flops *= mesh.size  # The SPMD program (one device's share) is counted.
    source += f' x {mesh.size} devices'
  analytic = analytic_flops(model_config, hw, batch, train)
  if step_flops is None and analytic is not None:
    step_flops, source = analytic, 'analytic matmul count'
  peak_after = matmul_peak(peak_dtype, matmul_size, matmul_runs)
  peak = max(peak_before, peak_after, key=lambda p: p['flops_per_second'])
  achieved = step_flops / median if step_flops else None
  # The peak was measured on one device; the model ran on mesh.size of them.
  peak_total = peak['flops_per_second'] * mesh.size
  return BenchmarkResult(
    model=model_config.name,
    mode='train' if train else 'inference',
    batch=batch,
    resolution=hw,
    dtype=dtype,
    backend=jax.default_backend(),
    devices=mesh.size,
    compile_seconds=compile_seconds,
    step_seconds_median=median,
    step_seconds_all=times,
    images_per_second=batch / median,
    flops_per_step=step_flops,
    flops_source=source,
    analytic_flops_per_step=analytic,
    achieved_flops_per_second=achieved,
    matmul_peak_flops_per_second=peak_total,
    matmul_size=peak['size'],
    matmul_peak_before_after=(
      peak_before['flops_per_second'] * mesh.size,
      peak_after['flops_per_second'] * mesh.size,
    ),
    share_of_peak=achieved / peak_total if achieved else None,
    matmul_dtype=matmul_dtype,
    analytic_share_of_peak=analytic / median / peak_total if analytic else None,
  )


def _model_config(config, num_classes: int):
  return steps.make_model(config, num_classes)[0]


def _memory(args, resolution, overrides) -> memory.MemoryReport:
  config = _train_config(
    args.model, args.batch, args.dtype, {'scan': False, **overrides}, args.fsdp
  )
  hw = tuple(resolution or _model_config(config, args.num_classes).image_size)
  return memory.train_step_memory(config, args.num_classes, (*hw, 3))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m mixer_vit.benchmark',
    description='Compile time, images/s and FLOP/s (vs. a measured matmul peak) of a model.',
  )
  parser.add_argument('--model', required=True, help='model name, e.g. ViT-B_16')
  parser.add_argument('--batch', type=int, default=32, help='global batch size')
  parser.add_argument('--train', action='store_true', help='time the training step')
  parser.add_argument(
    '--dtype',
    choices=('float32', 'bfloat16', 'float16'),
    default='float32',
    help='compute dtype (parameters stay float32)',
  )
  parser.add_argument(
    '--mixed',
    action='store_true',
    help='time float32 and mixed precision (bfloat16 multiplies, float32 sums) side by side',
  )
  parser.add_argument('--resolution', help="R or H,W (default: the model's, 224)")
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--runs', type=int, default=10, help='timed runs (median reported)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed runs after compiling')
  parser.add_argument(
    '--matmul_size', type=int, default=None, help='side of the square matmul that measures the peak'
  )
  parser.add_argument(
    '--remat',
    nargs='?',
    const='nothing',
    choices=tuple(models.REMAT_POLICIES),
    help='rematerialise the blocks (less memory); optionally what to keep: '
    f'{", ".join(models.REMAT_POLICIES)} (default nothing)',
  )
  parser.add_argument(
    '--fsdp', type=int, default=1, help='shard the train state over this many devices'
  )
  parser.add_argument(
    '--attention_impl',
    choices=vit.ATTENTION_IMPLS,
    help="ViT attention (model.attention_impl; default the model's, 'auto': padded cuDNN flash "
    'attention on a CUDA GPU in half precision, XLA on TPU, einsum on CPU)',
  )
  parser.add_argument(
    '--scan',
    action='store_true',
    help='one nn.scan over the layers (model.scan; XLA then counts the FLOPs of one layer)',
  )
  parser.add_argument(
    '--memory',
    action='store_true',
    help="with --train: compile only and print XLA's per-device memory of the step",
  )
  parser.add_argument('--json', action='store_true', help='print the result as JSON')
  args = parser.parse_args(argv)
  overrides = {'remat': True, 'remat_policy': args.remat} if args.remat else {}
  if args.scan:
    overrides['scan'] = True
  if args.attention_impl:
    overrides['attention_impl'] = args.attention_impl
  try:
    for flag in ('batch', 'runs', 'num_classes', 'matmul_size', 'fsdp', 'warmup'):
      value = getattr(args, flag)
      if value is not None and (value < 0 or (value == 0 and flag != 'warmup')):
        least = 'a number >= 0' if flag == 'warmup' else 'a positive number'
        raise ValueError(f'--{flag}={value}: give {least}.')
    resolution = sizes.parse(args.resolution)
    if args.memory:
      if not args.train:
        raise ValueError('--memory reports the training step: add --train.')
      report = _memory(args, resolution, overrides)
      print(json.dumps(report.as_dict()) if args.json else report.summary())
      return 0
    if args.mixed and args.dtype != 'float32':
      raise ValueError('--mixed compares with float32: leave --dtype out.')
    results = [
      benchmark(
        args.model,
        args.batch,
        args.train,
        args.dtype,
        resolution,
        args.num_classes,
        args.runs,
        args.warmup,
        args.matmul_size,
        overrides=overrides,
        fsdp=args.fsdp,
        matmul_dtype=matmul_dtype,
      )
      for matmul_dtype in ((None, 'bfloat16') if args.mixed else (None,))
    ]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    rows = [dataclasses.asdict(r) for r in results]
    print(json.dumps(rows if args.mixed else rows[0]))
    return 0
  print('\n'.join(r.summary() for r in results))
  if args.mixed:
    ratio = results[1].images_per_second / results[0].images_per_second
    print(f'mixed precision / float32: {ratio:.2f}x images/s')
  return 0


if __name__ == '__main__':
  tcmalloc.maybe_reexec('mixer_vit.benchmark')
  sys.exit(main())
