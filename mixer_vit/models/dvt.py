"""Dynamic Vision Transformer (Wang et al., NeurIPS 2021): a cascade of ViTs, coarse to fine.

Stage k is a `vit.VisionTransformer` of the model's size (the config's ViT keys) run on the image
resized to `stage_sizes[k]`, so each stage sees a finer token grid than the one before; each has
its own head. Its parameters are the subtree `stage_<k>`, named as a plain ViT's, so a stage loads
from (and equals) a ViT checkpoint of that size and resolution. Two switchable links carry work
from stage k-1 to stage k (k >= 1), each a small MLP whose last layer starts at zero, so that at
initialisation every stage computes what a plain ViT would:

- feature reuse (`feature_reuse_<k>`, `feature_reuse=True`): the previous stage's final tokens
  (after its encoder's LayerNorm) through LayerNorm -> Dense(reuse_hidden) -> GELU -> Dense(D),
  resampled to the new token grid, added to the new stage's tokens before its position embedding;
- relationship reuse (`relation_reuse_<k>`, `relation_reuse=True`): the previous stage's attention
  logits of every layer and head, stacked on one axis, through Dense(reuse_hidden) -> GELU ->
  Dense(layers x heads) along that axis, resampled to the new grid on both the query and the key
  axis, added to the new stage's attention logits, one (B, heads, T, T) slice per layer.

Resampling is bilinear on the token grid with the corners aligned (`resample_matrix`); the class
token maps to the class token. `__call__` returns the last stage's logits (B, classes), as any
classifier of this project does, or with `all_stages=True` every stage's, stacked (K, B,
classes); `run_stage` runs one stage given the previous one's reuse state (`adaptive.py` runs the
cascade on the images still in play).

FLOPs (`stage_flops`, `reuse_flops`, `exit_flops`): 2 x multiply-adds of the matrix products and
convolutions: a stage as `models.flops` counts a ViT or hybrid, plus the reuse MLPs and the
resampling products. Norms, softmax and activations are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixer_vit.models import common
from mixer_vit.models import flops
from mixer_vit.models import geometry
from mixer_vit.models import precision
from mixer_vit.models import vit
from mixer_vit.runtime import sizes

Dtype = Any
Params = dict[str, Any]

# Config keys of the cascade; every other key is the stages' ViT key.
DVT_KEYS = ('stage_sizes', 'feature_reuse', 'relation_reuse', 'reuse_hidden')
# Pooling a cascade stage may use (the 'unpooled' classifiers give no one prediction per image).
CLASSIFIERS = ('token', 'gap', 'map')
LOAD_HINTS = vit.LOAD_HINTS


def stage_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
  """The plain ViT config of stage `k` of a `dvt` model config: its ViT keys, family 'vit' and
  image_size = stage_sizes[k] (what a ViT checkpoint for that stage was made with)."""
  values = {key: value for key, value in config.to_dict().items() if key not in DVT_KEYS}
  values.update(family='vit', name=f'{config.name}/stage_{k}')
  values['image_size'] = tuple(config.stage_sizes[k])
  return ml_collections.ConfigDict(values)


def num_stages(config: ml_collections.ConfigDict) -> int:
  return len(config.stage_sizes)


def num_tokens(config: ml_collections.ConfigDict, k: int) -> int:
  """Tokens of stage `k`: its grid, plus the class token of the 'token' classifier."""
  rows, cols = geometry.token_grid(stage_config(config, k))
  return rows * cols + (1 if config.classifier == 'token' else 0)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first cascade setting that cannot work."""
  if config.classifier not in CLASSIFIERS:
    raise ValueError(
      f'classifier={config.classifier!r}: a dvt stage needs one prediction per image; use one of '
      f'{CLASSIFIERS}.'
    )
  if not config.stage_sizes:
    raise ValueError('stage_sizes is empty; give one (H, W) per stage, e.g. ((16, 16), (32, 32)).')
  per_token = geometry.pixels_per_token(config)
  for k, size in enumerate(config.stage_sizes):
    h, w = sizes.pair(size, f'stage_sizes[{k}]')
    if h % per_token[0] or w % per_token[1] or min(h, w) < 1:
      raise ValueError(
        f'stage_sizes[{k}]={h, w} is not a whole number of {per_token[0]}x{per_token[1]}-pixel '
        f'tokens; use multiples of {per_token}.'
      )
  if config.reuse_hidden < 1:
    raise ValueError(f'reuse_hidden must be >= 1, got {config.reuse_hidden}.')


def resample_matrix(old_grid: tuple[int, int], new_grid: tuple[int, int], cls: bool) -> np.ndarray:
  """(new tokens, old tokens): bilinear resampling of a token grid, corners aligned (as
  `vit.resize_posemb_grid`), row-major tokens; with `cls` the class token first, mapped to
  itself."""
  rows = vit._interp_axis(np.eye(old_grid[0]), 0, new_grid[0])
  cols = vit._interp_axis(np.eye(old_grid[1]), 0, new_grid[1])
  grid = np.kron(rows, cols)
  if not cls:
    return grid.astype(np.float32)
  out = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1))
  out[0, 0] = 1.0
  out[1:, 1:] = grid
  return out.astype(np.float32)


class FeatureReuse(nn.Module):
  """Previous stage's tokens -> LayerNorm, Dense, GELU, Dense (zero init) -> resampled tokens."""

  hidden: int
  features: int
  resample: np.ndarray  # (new tokens, old tokens)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, tokens):
    dense = lambda n, **kw: nn.Dense(
      n,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      **kw,
      **precision.matmul_kwargs(self.matmul_dtype),
    )
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype)(tokens)
    x = nn.gelu(dense(self.hidden)(x), approximate=True)
    x = dense(self.features, kernel_init=nn.initializers.zeros)(x)
    return jnp.einsum('ts,bsd->btd', jnp.asarray(self.resample, x.dtype), x)


class RelationReuse(nn.Module):
  """Previous stage's attention logits (layers, B, heads, T, T) -> Dense, GELU, Dense (zero init)
  over the (layer, head) axis -> resampled to the new grid, (new layers, B, new heads, T', T')."""

  hidden: int
  num_layers: int
  num_heads: int
  resample: np.ndarray  # (new tokens, old tokens)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, logits):
    layers, batch, heads, t, _ = logits.shape
    x = jnp.transpose(logits, (1, 3, 4, 0, 2)).reshape(batch, t, t, layers * heads)
    dense = lambda n, **kw: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, **kw)
    x = nn.gelu(dense(self.hidden)(x), approximate=True)
    x = dense(self.num_layers * self.num_heads, kernel_init=nn.initializers.zeros)(x)
    m = jnp.asarray(self.resample, x.dtype)
    x = jnp.einsum('ps,bsrc->bprc', m, x)
    x = jnp.einsum('qr,bprc->bpqc', m, x)
    new_t = m.shape[0]
    x = x.reshape(batch, new_t, new_t, self.num_layers, self.num_heads)
    return jnp.transpose(x, (3, 0, 4, 1, 2))


class DynamicViT(nn.Module):
  """The cascade (module docstring). Fields: the ViT's, plus `stage_sizes` ((H, W) per stage),
  `feature_reuse`, `relation_reuse` and `reuse_hidden` (the reuse MLPs' width)."""

  num_classes: int | None
  patches: Mapping[str, Any]
  hidden_size: int
  transformer: Mapping[str, Any]
  stage_sizes: tuple[tuple[int, int], ...] = ((16, 16), (32, 32))
  feature_reuse: bool = True
  relation_reuse: bool = True
  reuse_hidden: int = 64
  resnet: Mapping[str, Any] | None = None
  classifier: str = 'token'
  representation_size: int | None = None
  head_bias_init: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  attention_impl: str = 'auto'
  remat: bool = False
  remat_policy: str = 'nothing'
  scan: bool = False
  dtype: Dtype = 'float32'
  param_dtype: Dtype = 'float32'
  matmul_dtype: Dtype | None = None

  def __post_init__(self):
    common.freeze_fields(self, 'patches', 'transformer', 'resnet', 'stage_sizes')
    super().__post_init__()

  @property
  def num_stages(self) -> int:
    return len(self.stage_sizes)

  def _config(self) -> ml_collections.ConfigDict:
    """The model config these fields describe (for the token grids)."""
    c = ml_collections.ConfigDict()
    c.name, c.family, c.image_size = 'dvt', 'dvt', tuple(self.stage_sizes[-1])
    c.patches = {'size': tuple(self.patches['size'])}
    c.resnet = None if self.resnet is None else dict(self.resnet)
    c.classifier = self.classifier
    c.stage_sizes = tuple(tuple(s) for s in self.stage_sizes)
    return c

  def setup(self):
    vit_fields = {
      name: getattr(self, name)
      for name in vit.VisionTransformer.__dataclass_fields__
      if name not in ('parent', 'name') and hasattr(self, name)
    }
    config = self._config()
    cls = self.classifier == 'token'
    dtype, param_dtype = common.to_dtype(self.dtype), common.to_dtype(self.param_dtype)
    for k in range(self.num_stages):
      setattr(self, f'stage_{k}', vit.VisionTransformer(**vit_fields))
      if k == 0:
        continue
      old = geometry.token_grid(config, config.stage_sizes[k - 1])
      new = geometry.token_grid(config, config.stage_sizes[k])
      resample = resample_matrix(old, new, cls)
      if self.feature_reuse:
        setattr(
          self,
          f'feature_reuse_{k}',
          FeatureReuse(
            self.reuse_hidden,
            self.hidden_size,
            resample,
            dtype=dtype,
            param_dtype=param_dtype,
            matmul_dtype=precision.to_matmul_dtype(self.matmul_dtype),
          ),
        )
      if self.relation_reuse:
        setattr(
          self,
          f'relation_reuse_{k}',
          RelationReuse(
            self.reuse_hidden,
            self.transformer['num_layers'],
            self.transformer['num_heads'],
            resample,
            dtype=dtype,
            param_dtype=param_dtype,
          ),
        )

  def run_stage(self, images, k: int, previous=None, *, train: bool = False):
    """Stage `k` on `images` (at any size; resized to `stage_sizes[k]`) given `previous`, the
    reuse state stage k-1 returned (None for stage 0). Returns `(logits, state)`: the stage's
    float32 logits (B, classes) and its reuse state for stage k+1 ({} after the last stage or
    with reuse off)."""
    h, w = self.stage_sizes[k]
    if images.shape[1:3] != (h, w):
      images = jax.image.resize(images, (images.shape[0], h, w, images.shape[3]), 'bilinear')
    token_bias = attention_bias = None
    if k > 0 and self.feature_reuse:
      token_bias = getattr(self, f'feature_reuse_{k}')(previous['tokens'])
    if k > 0 and self.relation_reuse:
      attention_bias = getattr(self, f'relation_reuse_{k}')(previous['logits'])
    stage = getattr(self, f'stage_{k}')
    reuse = k + 1 < self.num_stages and (self.feature_reuse or self.relation_reuse)
    if not reuse:
      logits = stage(images, train=train, token_bias=token_bias, attention_bias=attention_bias)
      return logits, {}
    logits, tokens, attention = stage(
      images, train=train, token_bias=token_bias, attention_bias=attention_bias, return_reuse=True
    )
    state = {}
    if self.feature_reuse:
      state['tokens'] = tokens
    if self.relation_reuse:
      state['logits'] = attention
    return logits, state

  def __call__(self, images, *, train: bool = False, all_stages: bool = False):
    common.check_images(images, 'DynamicViT')
    previous, outputs = None, []
    for k in range(self.num_stages):
      logits, previous = self.run_stage(images, k, previous, train=train)
      outputs.append(logits)
    return jnp.stack(outputs) if all_stages else outputs[-1]


Model = DynamicViT


# ------------------------------------------------------------------------------------------------
# FLOPs.


def stage_flops(config: ml_collections.ConfigDict, k: int) -> float:
  """Matrix-multiply and convolution FLOPs of stage `k` alone on one image (`models.flops`)."""
  return flops.forward_flops(stage_config(config, k))


def reuse_flops(config: ml_collections.ConfigDict, k: int) -> float:
  """Matrix-multiply FLOPs of the reuse from stage k-1 into stage `k` (k >= 1) on one image: the
  reuse MLPs at the old grid and the resampling products (0 for stage 0 or with reuse off)."""
  if k == 0:
    return 0.0
  old, new = num_tokens(config, k - 1), num_tokens(config, k)
  d, h = config.hidden_size, config.reuse_hidden
  channels = config.transformer.num_layers * config.transformer.num_heads
  macs = 0
  if config.feature_reuse:
    macs += old * (d * h + h * d) + new * old * d
  if config.relation_reuse:
    macs += old * old * (channels * h + h * channels)
    macs += new * old * old * channels + new * new * old * channels
  return 2.0 * macs


def exit_flops(config: ml_collections.ConfigDict) -> np.ndarray:
  """(K,): FLOPs per image that leaves after stage k: stages 0..k and the reuse into 1..k."""
  per_stage = [stage_flops(config, k) + reuse_flops(config, k) for k in range(num_stages(config))]
  return np.cumsum(per_stage)


# ------------------------------------------------------------------------------------------------
# Checkpoints: a DVT tree is {'stage_<k>': ViT tree, 'feature_reuse_<k>': ..., ...}; a plain ViT
# tree (a released or trained ViT `.npz`) initialises every stage (models.load_pretrained).


def _is_vit_tree(params: Mapping) -> bool:
  return 'Transformer' in params and not any(key.startswith('stage_') for key in params)


def fix_legacy(params: Mapping) -> Params:
  """Each stage's older layouts fixed as a ViT's (`vit.fix_legacy`); a plain ViT tree is kept
  whole (`adapt_pretrained` copies it into every stage)."""
  if _is_vit_tree(params):
    return vit.fix_legacy(params)
  return {
    key: vit.fix_legacy(value) if key.startswith('stage_') else dict(value)
    for key, value in params.items()
  }


def adapt_pretrained(
  restored: Params,
  expected: Mapping,
  config: Any,
  source_grid: tuple[int, int] | None = None,
) -> None:
  """Fits a pretrained tree (in place) to the cascade: a plain ViT tree becomes every stage; each
  stage is adapted as a ViT of its resolution (head the new model's, pre_logits / MAP head kept or
  renewed, position embeddings resized); reuse modules the checkpoint lacks are the new model's."""
  if _is_vit_tree(restored):
    vit_tree = dict(restored)
    restored.clear()
    for k in range(num_stages(config)):
      restored[f'stage_{k}'] = jax.tree.map(lambda x: x, vit_tree)
  for key, value in expected.items():
    if not key.startswith('stage_'):
      restored.setdefault(key, dict(value))
      continue
    k = int(key[len('stage_') :])
    stage = dict(restored.get(key, {}))
    if 'head' in expected[key]:
      stage['head'] = dict(expected[key]['head'])
    elif 'head' in stage:
      del stage['head']
    vit.adapt_pretrained(stage, expected[key], stage_config(config, k), source_grid)
    restored[key] = stage


def num_grid_tokens(params: Mapping) -> int | None:
  """None: a cascade's resolution is its config's (`stage_sizes`), never read from a tree."""
  del params
  return None
