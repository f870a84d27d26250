r"""This project's ViT against the original code's, timed side by side in one jitted harness.

  git clone https://github.com/google-research/vision_transformer /tmp/vision_transformer
  python -m mixer_vit.benchmark_vs_original --original=/tmp/vision_transformer \
      --model=ViT-Ti_16 --train [--mixed] [--batch=32] [--rounds=7]

The original checkout stays outside the project; its ``vit_jax.models_vit.VisionTransformer`` is
built from its own ``vit_jax.configs.models.MODEL_CONFIGS[--model]`` and this project's from the
registry (dropout off in both, so neither draws random bits). Both run the same jitted function:
``--train`` one AdamW step on softmax cross-entropy (``optax``, state donated), otherwise the
forward pass; then ``--rounds`` rounds alternate one timed call of each, so both see the same
machine load. ``--mixed`` runs this project's model with ``matmul_dtype='bfloat16'`` against the
original in float32. The two parameter trees must hold the same number of parameters, else the
comparison is refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import importlib
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixer_vit import models
from mixer_vit.runtime import tcmalloc


def load_original(path: str, name: str, num_classes: int):
  """The original code's VisionTransformer `name`, imported from the checkout at `path`."""
  if not os.path.isfile(os.path.join(path, 'vit_jax', 'models_vit.py')):
    raise ValueError(
      f'--original={path}: no vit_jax/models_vit.py there; pass the root of a checkout of '
      'google-research/vision_transformer.'
    )
  sys.path.insert(0, os.path.abspath(path))
  try:
    models_vit = importlib.import_module('vit_jax.models_vit')
    configs = importlib.import_module('vit_jax.configs.models').MODEL_CONFIGS
  finally:
    sys.path.pop(0)
  if name not in configs:
    raise ValueError(f'--model={name}: the original code has no such config.')
  return models_vit.VisionTransformer(num_classes=num_classes, **configs[name])


def _step(model, images, labels, train: bool):
  """The shared harness: an AdamW step (train) or the forward pass, jitted."""
  rngs = {'dropout': jax.random.PRNGKey(2)}  # Unused at rate 0; some versions still ask.

  def apply(params):
    return model.apply({'params': params}, images, train=train, rngs=rngs)

  if not train:
    return jax.jit(lambda params, opt_state: (apply(params), opt_state)), None
  tx = optax.adamw(1e-3, weight_decay=1e-4)

  def step(params, opt_state):
    loss = lambda p: optax.softmax_cross_entropy(apply(p), labels).mean()  # noqa: E731
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1)), tx


def compare(original, ours, batch: int, train: bool, rounds: int, resolution: int = 224) -> dict:
  """Median seconds per call of each model, alternating `rounds` times after one warm-up."""
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, resolution, resolution, 3))
  num_classes = ours.num_classes
  labels = jax.nn.one_hot(jnp.arange(batch) % num_classes, num_classes)
  runners = {}
  for tag, model in (('original', original), ('ours', ours)):
    init = jax.jit(
      lambda m=model: m.init({'params': jax.random.PRNGKey(1)}, images[:1], train=False)
    )
    params = init()['params']
    runners[tag] = {'count': sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))}
    fn, tx = _step(model, images, labels, train)
    state = (params, tx.init(params) if tx else None)
    out = jax.block_until_ready(fn(*state))  # Compiles; the warm-up.
    if train:  # The step donated the old state; inference keeps its parameters.
      state = out
    runners[tag].update(fn=fn, state=state, times=[])
  if runners['original']['count'] != runners['ours']['count']:
    raise ValueError(
      f'the models differ: {runners["original"]["count"]:,} parameters in the original, '
      f'{runners["ours"]["count"]:,} here.'
    )
  for _ in range(rounds):
    for run in runners.values():
      start = time.perf_counter()
      out = jax.block_until_ready(run['fn'](*run['state']))
      run['times'].append(time.perf_counter() - start)
      if train:
        run['state'] = out
  medians = {tag: statistics.median(run['times']) for tag, run in runners.items()}
  return {
    'parameters': runners['ours']['count'],
    'seconds': medians,
    'images_per_second': {tag: batch / s for tag, s in medians.items()},
    'ratio': medians['original'] / medians['ours'],
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m mixer_vit.benchmark_vs_original',
    description="This project's ViT vs the original vit_jax model, in one jitted harness.",
  )
  parser.add_argument(
    '--original', required=True, help='a google-research/vision_transformer checkout'
  )
  parser.add_argument('--model', default='ViT-Ti_16', help='a ViT name both codes know')
  parser.add_argument('--train', action='store_true', help='time an AdamW step, not inference')
  parser.add_argument('--mixed', action='store_true', help="ours with matmul_dtype='bfloat16'")
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=7, help='alternating timed calls of each')
  parser.add_argument('--num_classes', type=int, default=1000)
  args = parser.parse_args(argv)
  try:
    original = load_original(args.original, args.model, args.num_classes)
    config = models.get_model_config(
      args.model,
      num_classes=args.num_classes,
      dropout_rate=0.0,
      matmul_dtype='bfloat16' if args.mixed else None,
    )
    result = compare(original, models.build_model(config), args.batch, args.train, args.rounds)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  work = 'train step' if args.train else 'inference'
  for tag in ('original', 'ours'):
    precision = 'mixed' if tag == 'ours' and args.mixed else 'float32'
    print(
      f'{tag:>8} ({precision}): {result["images_per_second"][tag]:.2f} images/s '
      f'(median of {args.rounds})'
    )
  print(f'{args.model} {work}, batch {args.batch}: ours / original = {result["ratio"]:.2f}x')
  return 0


if __name__ == '__main__':
  tcmalloc.maybe_reexec('mixer_vit.benchmark_vs_original')
  sys.exit(main())
