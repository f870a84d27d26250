r"""Few-shot linear probes of a model's representation: closed-form ridge regression on frozen
features of k examples per class, the method of big_vision's ``fewshot_lsr`` evaluator.

For each data set of ``config.fewshot`` (default: the training data set itself):
1. Features: ``models.apply_with_intermediates`` gives the layer ``config.fewshot.layer``
   (``pre_logits``, the head's input, by default) of every example of the train and the test
   split, read once each by the evaluation pipeline (``data.make_eval_iterator``: padding rows
   masked out), data parallel over the mesh and gathered on the host.
2. Shots: for each class, a permutation of its train examples (in the split's order) drawn by
   ``numpy.random.default_rng(config.fewshot.seed)``; the k-shot set is the first k of each class,
   so the sets are nested (the 1-shot examples are among the 5-shot ones) and exactly reproducible.
3. Regression: features standardised with the mean and standard deviation of the k-shot set,
   targets +1 for the label and -1 for the other classes, an unregularised intercept and, for each
   L2 strength of ``config.fewshot.l2_regs``, the closed-form ridge solution (one eigendecomposition
   serves the whole grid; float64 on the host). The prediction is the class with the largest score.
4. Selection (``config.fewshot.select``): ``'loo'`` (default) picks the L2 strength with the best
   leave-one-out accuracy on the k-shot examples themselves (exact, in closed form; ties go to the
   lower leave-one-out squared error), so the test split is used only to report; ``'test'`` reports
   the best test accuracy over the grid (big_vision's earlier convention; optimistic).

Results are scalars ``fewshot/<name>_<k>shot`` (test accuracy in [0, 1]). During training
``make_evaluator(config, model, mesh)`` returns an ``Evaluator`` (None when
``config.fewshot_every`` is 0) whose ``run(params)`` gives them; ``python -m mixer_vit.evaluate
--fewshot`` prints them for a checkpoint.

The choice of the shots follows the order of each split's examples. With several processes that
order is recovered from the split (``Split.eval_indices``); splits that cannot tell it (streamed
tfds sets) are ordered by (process, position), which then depends on the process count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit import data
from mixer_vit import models
from mixer_vit.runtime import parallel

LAYERS = ('pre_logits', 'logits', 'encoded', 'blocks/<i>')
SELECT = ('loo', 'test')
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REGS = tuple(2.0**k for k in range(-6, 17, 2))


# ------------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class FewShotData:
  """One data set to probe: its metric name, the data set, its splits and preprocessing."""

  name: str  # In the metric names: fewshot/<name>_<k>shot.
  dataset: str  # 'digits', a tfds name or an image folder, as config.dataset.
  train_split: str = 'train'
  test_split: str = 'test'
  pp: str | None = None  # None: the config's pp_test.


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
  """The settings of ``config.fewshot`` (and ``config.fewshot_every``), read once and checked."""

  datasets: tuple[FewShotData, ...]
  shots: tuple[int, ...] = DEFAULT_SHOTS
  layer: str = 'pre_logits'
  l2_regs: tuple[float, ...] = DEFAULT_L2_REGS
  select: str = 'loo'
  seed: int = 0
  every: int = 0  # config.fewshot_every; 0: never during training.

  @classmethod
  def from_config(cls, config: Any) -> FewShotConfig:
    """Reads ``config.fewshot`` (missing keys take the defaults, e.g. in older workdirs)."""
    fs = config.get('fewshot', None) or {}
    get = lambda key, default: default if fs.get(key, None) is None else fs.get(key)
    every = config.get('fewshot_every', 0) or 0
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
      raise ValueError(
        f'config.fewshot_every must be an integer >= 0 (steps between few-shot evaluations; '
        f'0: none), got {every!r}'
      )
    return cls(
      datasets=parse_datasets(get('datasets', None), config),
      shots=parse_shots(get('shots', DEFAULT_SHOTS), 'config.fewshot.shots'),
      layer=check_layer(str(get('layer', 'pre_logits')), 'config.fewshot.layer'),
      l2_regs=_l2_regs(get('l2_regs', DEFAULT_L2_REGS)),
      select=_select(get('select', 'loo')),
      seed=_seed(get('seed', 0)),
      every=every,
    )


def metric_name(dataset: str) -> str:
  """A short name for a data set in metric names: tfds 'name/config:1.0.0' -> 'name_config', an
  image folder -> its base name."""
  if os.sep in dataset and os.path.isdir(dataset):
    dataset = os.path.basename(os.path.normpath(dataset))
  dataset = dataset.split(':')[0]
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset).strip('_') or 'data'


def parse_datasets(value: Any, config: Any) -> tuple[FewShotData, ...]:
  """``config.fewshot.datasets``: a mapping ``name -> dataset`` or ``name -> {'dataset',
  'train_split', 'test_split', 'pp'}``, a sequence of data sets, or empty/None for the training
  data set (with its ``train_split`` and ``test_split``)."""
  if not value:
    dataset = config.get('dataset', None)
    if not dataset:
      raise ValueError(
        'config.fewshot.datasets is empty and config.dataset is not set; name the data '
        "sets to probe, e.g. config.fewshot.datasets = {'digits': 'digits'}"
      )
    return (
      FewShotData(
        name=metric_name(str(dataset)),
        dataset=str(dataset),
        train_split=str(config.get('train_split', None) or 'train'),
        test_split=str(config.get('test_split', None) or 'test'),
      ),
    )
  if isinstance(value, str):
    value = [value]
  if hasattr(value, 'items'):
    items = list(value.items())
  elif isinstance(value, Sequence):
    items = [(metric_name(str(v)), v) for v in value]
  else:
    raise ValueError(
      f'config.fewshot.datasets must map names to data sets, e.g. {{"digits": "digits"}}, got '
      f'{value!r}'
    )
  result = []
  for name, spec in items:
    if isinstance(spec, str):
      spec = {'dataset': spec}
    spec = dict(spec.items()) if hasattr(spec, 'items') else None
    unknown = set(spec or ()) - {'dataset', 'train_split', 'test_split', 'pp'}
    if not spec or not spec.get('dataset') or unknown:
      raise ValueError(
        f'config.fewshot.datasets[{name!r}] must be a data set name/folder or a dict with '
        f"'dataset' and optionally 'train_split', 'test_split', 'pp'; got {spec!r}"
      )
    result.append(
      FewShotData(
        name=metric_name(str(name)),
        dataset=str(spec['dataset']),
        train_split=str(spec.get('train_split') or 'train'),
        test_split=str(spec.get('test_split') or 'test'),
        pp=spec.get('pp') or None,
      )
    )
  names = [d.name for d in result]
  if len(set(names)) != len(names):
    raise ValueError(f'config.fewshot.datasets: metric names repeat: {names}; rename the entries')
  return tuple(result)


def parse_shots(value: Any, key: str = 'shots') -> tuple[int, ...]:
  """Shots per class: a sequence of positive integers or text like '1,5,10'."""
  if isinstance(value, str):
    value = [v for v in value.replace(' ', '').split(',') if v]
  elif isinstance(value, int):
    value = [value]
  try:
    shots = tuple(int(v) for v in value)
    bad = not shots or any(k < 1 or k != float(v) for k, v in zip(shots, value))
  except (TypeError, ValueError):
    bad = True
  if bad:
    raise ValueError(
      f'{key} must be positive integers (examples per class), e.g. 1,5,10; got {value!r}'
    )
  return tuple(sorted(set(shots)))


def check_layer(layer: str, key: str = 'layer') -> str:
  if layer in ('pre_logits', 'logits', 'encoded') or re.fullmatch(r'blocks/\d+', layer):
    return layer
  raise ValueError(f'{key}={layer!r} is not a feature layer; use one of {LAYERS}')


def _l2_regs(value: Any) -> tuple[float, ...]:
  try:
    regs = tuple(float(v) for v in ([value] if isinstance(value, (int, float)) else value))
  except (TypeError, ValueError):
    regs = ()
  if not regs or not all(math.isfinite(r) and r > 0 for r in regs):
    raise ValueError(
      f'config.fewshot.l2_regs must be positive numbers (the L2 strengths tried), got {value!r}'
    )
  return regs


def _select(value: Any) -> str:
  if value not in SELECT:
    raise ValueError(
      f"config.fewshot.select must be 'loo' (leave-one-out on the shots) or 'test' (best test "
      f'accuracy over the grid), got {value!r}'
    )
  return value


def _seed(value: Any) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ValueError(f'config.fewshot.seed must be an integer >= 0, got {value!r}')
  return value


# ------------------------------------------------------------------------------------------------
# The choice of the shots and the regression (numpy, float64, on the host).


def choose_shots(labels: np.ndarray, num_classes: int, shots: Sequence[int], seed: int) -> dict:
  """``{k: indices into labels}``: k examples of every class, nested over k, a function of
  (labels, seed) only.

  Raises:
    ValueError: a class has fewer than ``max(shots)`` examples.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  most = max(shots)
  short = {c: len(p) for c, p in enumerate(per_class) if len(p) < most}
  if short:
    raise ValueError(
      f'{most} shots need {most} train examples of every class, but classes {short} (class: '
      'count) have fewer; lower the shots (config.fewshot.shots / --shots)'
    )
  return {k: np.sort(np.concatenate([p[:k] for p in per_class])) for k in shots}


@dataclasses.dataclass
class RidgePath:
  """Ridge regressions of targets ``y`` (N, C) on features ``x`` (N, D), one per L2 strength,
  with an unregularised intercept: ``scores = x @ weights[j] + bias[j]``."""

  l2_regs: np.ndarray  # (L,)
  weights: np.ndarray  # (L, D, C)
  bias: np.ndarray  # (L, C)
  loo_scores: np.ndarray  # (L, N, C): the score of each example by the fit without it.

  def scores(self, x: np.ndarray) -> np.ndarray:
    """(L, M, C) scores of the rows of ``x`` under each regression."""
    return np.einsum('md,ldc->lmc', np.asarray(x, np.float64), self.weights) + self.bias[:, None]


def ridge_path(x: np.ndarray, y: np.ndarray, l2_regs: Sequence[float]) -> RidgePath:
  """Minimises ``|x w + b - y|^2 + l2 |w|^2`` over (w, b) for every ``l2`` in closed form.

  Centring removes the intercept; one eigendecomposition of the (D, D) or, when N < D, the (N, N)
  Gram matrix of the centred features then gives every solution. The leave-one-out scores use the
  exact identity of penalised least squares, ``y_i - s_-i = (y_i - s_i) / (1 - h_ii)``, with
  ``h_ii`` the diagonal of the hat matrix (``1/N`` from the intercept plus the ridge part).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n, dim = x.shape
  regs = np.asarray(l2_regs, np.float64)
  x_mean, y_mean = x.mean(0), y.mean(0)
  xc, yc = x - x_mean, y - y_mean
  if n >= dim:  # (x^T x + l2)^-1 x^T y with x^T x = q diag(e) q^T.
    e, q = np.linalg.eigh(xc.T @ xc)
    e = np.maximum(e, 0.0)
    p = xc @ q  # (N, D): the features in the eigenbasis.
    rhs = p.T @ yc  # (D, C)
    inv = 1.0 / (e[None] + regs[:, None])  # (L, D)
    weights = np.einsum('dk,lk,kc->ldc', q, inv, rhs)
    fitted = np.einsum('nk,lk,kc->lnc', p, inv, rhs)
    hat = np.einsum('nk,lk->ln', p**2, inv)
  else:  # x^T (x x^T + l2)^-1 y with x x^T = u diag(e) u^T.
    e, u = np.linalg.eigh(xc @ xc.T)
    e = np.maximum(e, 0.0)
    rhs = u.T @ yc  # (N, C)
    inv = 1.0 / (e[None] + regs[:, None])  # (L, N)
    weights = np.einsum('nd,nk,lk,kc->ldc', xc, u, inv, rhs)
    fitted = np.einsum('nk,lk,kc->lnc', u, e[None] * inv, rhs)
    hat = np.einsum('nk,lk->ln', u**2, e[None] * inv)
  bias = y_mean[None] - np.einsum('d,ldc->lc', x_mean, weights)
  fitted = fitted + y_mean
  hat = hat + 1.0 / n
  # With l2 > 0, h_ii < 1; the floor only guards rounding in near-interpolating fits.
  loo = y - (y - fitted) / np.maximum(1.0 - hat, 1e-12)[..., None]
  return RidgePath(l2_regs=regs, weights=weights, bias=bias, loo_scores=loo)


def probe(
  train_x: np.ndarray,
  train_labels: np.ndarray,
  test_x: np.ndarray,
  test_labels: np.ndarray,
  num_classes: int,
  l2_regs: Sequence[float],
  select: str = 'loo',
) -> dict[str, Any]:
  """Fits the ridge probes on (train_x, train_labels) and measures them on the test set.

  Returns ``{'accuracy', 'l2', 'loo_accuracy', 'test_accuracies'}``: the test accuracy at the
  selected L2 strength, that strength, the leave-one-out accuracy there, and the test accuracy
  of every strength of the grid.
  """
  _select(select)
  train_x = np.asarray(train_x, np.float64)
  mean, std = train_x.mean(0), train_x.std(0) + 1e-5
  standardise = lambda x: (np.asarray(x, np.float64) - mean) / std
  targets = 2.0 * np.eye(num_classes)[np.asarray(train_labels)] - 1.0
  path = ridge_path(standardise(train_x), targets, l2_regs)
  test_acc = (path.scores(standardise(test_x)).argmax(-1) == np.asarray(test_labels)).mean(-1)
  loo_acc = (path.loo_scores.argmax(-1) == np.asarray(train_labels)).mean(-1)
  loo_err = ((path.loo_scores - targets) ** 2).mean((1, 2))
  if select == 'test':
    best = int(np.argmax(test_acc))
  else:  # Best leave-one-out accuracy, then lowest leave-one-out error.
    best = min(range(len(path.l2_regs)), key=lambda j: (-loo_acc[j], loo_err[j]))
  return {
    'accuracy': float(test_acc[best]),
    'l2': float(path.l2_regs[best]),
    'loo_accuracy': float(loo_acc[best]),
    'test_accuracies': [float(a) for a in test_acc],
  }


# ------------------------------------------------------------------------------------------------
# Features over the mesh.


def _layer_output(layer: str, logits: jax.Array, out: Mapping[str, jax.Array]) -> jax.Array:
  if layer == 'logits':
    x = logits
  elif layer.startswith('blocks/'):
    blocks = out['blocks']
    i = int(layer.split('/')[1])
    if i >= blocks.shape[0]:
      raise ValueError(f'feature layer {layer!r}: the model has {blocks.shape[0]} blocks')
    x = blocks[i]
  elif layer in out:
    x = out[layer]
  else:
    raise ValueError(f'feature layer {layer!r}: this model gives {sorted(out)} and logits')
  x = x.astype(jnp.float32)
  return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1) if x.ndim > 2 else x  # Token mean.


def make_feature_fn(model: Any, layer: str, mesh: jax.sharding.Mesh):
  """A jitted ``(params, batch) -> (features, labels, mask)``, replicated (gathered) outputs."""
  check_layer(layer)

  def features(params, batch):
    logits, out = models.apply_with_intermediates(model, params, batch['image'])
    labels = jnp.argmax(batch['labels'], axis=-1).astype(jnp.int32)
    return _layer_output(layer, logits, out), labels, batch['mask'].astype(bool)

  repl = parallel.replicated(mesh)
  return jax.jit(features, in_shardings=(repl, parallel.batch_sharding(mesh)), out_shardings=repl)


def _split_order(config: Any, split: str, mesh, num_batches: int, batch_size: int) -> np.ndarray:
  """For every row of the gathered global batches (in order), a key of its example in the split:
  its index in the split, or (process, position) when the split cannot tell."""
  index, count = parallel.process_shard(mesh)
  del index
  local = batch_size // count
  rows = np.arange(num_batches * batch_size)
  batch, row = rows // batch_size, rows % batch_size
  process, position = row // local, batch * local + row % local
  if count == 1:
    return position
  source_split = data.sources.open_source(data.DataConfig.from_config(config)).split(split)
  keys = np.full(rows.shape, -1, np.int64)
  for p in range(count):
    found = source_split.eval_indices(p, count, position[process == p])
    if found is None:
      logging.warning(
        'few-shot: the split %r cannot tell its example order; the shots depend on the '
        'process count',
        split,
      )
      return process * (num_batches * local) + position
    keys[process == p] = found
  return keys


class Evaluator:
  """Few-shot probes of ``model`` on the data sets of ``config.fewshot``; ``run(params)``."""

  def __init__(
    self,
    config: Any,
    model: Any,
    mesh: jax.sharding.Mesh | None = None,
    settings: FewShotConfig | None = None,
  ):
    self.settings = settings or FewShotConfig.from_config(config)
    self.config = config
    self.model = model
    self.mesh = mesh or parallel.make_mesh()
    self._feature_fn = make_feature_fn(model, self.settings.layer, self.mesh)
    self._data: dict[tuple[str, str], tuple[Any, Any, int]] = {}

  def due(self, step: int, final: bool = False) -> bool:
    """Whether the training loop runs the probes after ``step``."""
    every = self.settings.every
    return bool(every) and (step % every == 0 or final)

  def _data_config(self, spec: FewShotData) -> Any:
    config = self.config.copy_and_resolve_references()
    with config.unlocked():
      config.dataset = spec.dataset
      config.train_split = spec.train_split
      config.test_split = spec.test_split
      if spec.pp:
        config.pp_test = spec.pp
      size = self.mesh.size
      batch = config.get('eval_batch_size', None) or config.get('batch_size', None) or size
      config.eval_batch_size = max(size, batch // size * size)
    return config

  def _iterator(self, spec: FewShotData, split: str):
    key = (spec.name, split)
    if key not in self._data:
      config = self._data_config(spec)
      batches = data.make_eval_iterator(config, self.mesh, split=split)
      order = _split_order(config, split, self.mesh, batches.num_batches, config.eval_batch_size)
      num_classes = data.get_info(config).num_classes
      self._data[key] = (batches, order, num_classes)
    return self._data[key]

  def features(self, params: Any, spec: FewShotData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D), labels (N,)) of every example of ``split``, in the split's order."""
    batches, order, _ = self._iterator(spec, split)
    feats, labels, masks = [], [], []
    for batch in batches:
      f, y, m = parallel.to_host(self._feature_fn(params, batch))
      feats.append(f)
      labels.append(y)
      masks.append(m)
    if not feats:
      raise ValueError(f'the split {split!r} of {spec.dataset!r} is empty')
    mask = np.concatenate(masks)
    keys = order[: len(mask)][mask]
    sort = np.argsort(keys, kind='stable')
    return np.concatenate(feats)[mask][sort], np.concatenate(labels)[mask][sort]

  def run_detailed(self, params: Any) -> list[dict[str, Any]]:
    """One row per (data set, shots): the accuracy, the L2 strength chosen and the counts."""
    s = self.settings
    params = parallel.replicate(params, self.mesh)
    rows = []
    for spec in s.datasets:
      train_x, train_y = self.features(params, spec, spec.train_split)
      test_x, test_y = self.features(params, spec, spec.test_split)
      num_classes = self._iterator(spec, spec.train_split)[2]
      chosen = choose_shots(train_y, num_classes, s.shots, s.seed)
      for k, idx in chosen.items():
        result = probe(train_x[idx], train_y[idx], test_x, test_y, num_classes, s.l2_regs, s.select)
        rows.append(
          {
            'name': f'fewshot/{spec.name}_{k}shot',
            'dataset': spec.dataset,
            'shots': k,
            'accuracy': result['accuracy'],
            'l2': result['l2'],
            'loo_accuracy': result['loo_accuracy'],
            'train_examples': len(idx),
            'test_examples': len(test_y),
            'select': s.select,
            'layer': s.layer,
          }
        )
    return rows

  def run(self, params: Any) -> dict[str, float]:
    """``{'fewshot/<name>_<k>shot': test accuracy}`` for the metrics writer."""
    return {row['name']: row['accuracy'] for row in self.run_detailed(params)}

  def run_and_write(self, step: int, total_steps: int, params: Any, writer: Any) -> dict:
    """``run(params)``, written with ``writer.write_scalars(step, ...)`` and logged; the values."""
    values = self.run(params)
    writer.write_scalars(step, values)
    logging.info('%s', summary_line(step, total_steps, values))
    return values


def make_evaluator(config: Any, model: Any, mesh: jax.sharding.Mesh) -> Evaluator | None:
  """The training loop's evaluator: None when ``config.fewshot_every`` is 0 (the default)."""
  settings = FewShotConfig.from_config(config)
  return Evaluator(config, model, mesh, settings) if settings.every else None


def summary_line(step: int, total_steps: int, values: Mapping[str, float]) -> str:
  """``step 500/1000  fewshot/digits_5shot 0.8127  ...`` for the log."""
  parts = [f'step {step}/{total_steps}'] + [f'{k} {v:.4f}' for k, v in sorted(values.items())]
  return '  '.join(parts)
