"""Mixed precision (`matmul_dtype='bfloat16'`): exact products, unchanged parameters, close logits."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_vit import models
from mixer_vit.models import precision

# (lhs shape, rhs shape, dimension numbers): a dense layer, DenseGeneral in and out of heads, the
# two attention products (batch dimensions b and h), and a contraction over the lhs's first axis.
PRODUCTS = [
  ((5, 7), (7, 3), (((1,), (0,)), ((), ()))),
  ((2, 5, 8), (8, 4, 6), (((2,), (0,)), ((), ()))),
  ((2, 5, 4, 6), (4, 6, 8), (((2, 3), (0, 1)), ((), ()))),
  ((2, 5, 3, 4), (2, 6, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),
  ((2, 3, 5, 6), (2, 6, 3, 4), (((3,), (1,)), ((0, 1), (0, 2)))),
  ((4, 5), (3, 4), (((0,), (1,)), ((), ()))),
]


def small_integers(rng, shape):
  """Exact in bfloat16, and so are their sums of products in float32: results compare exactly."""
  return jnp.asarray(rng.integers(-4, 5, shape).astype(np.float32))


@pytest.mark.parametrize('lhs_shape,rhs_shape,dims', PRODUCTS)
def test_mixed_product_and_its_gradients_are_exact_on_bfloat16_numbers(lhs_shape, rhs_shape, dims):
  rng = np.random.default_rng(0)
  lhs, rhs = small_integers(rng, lhs_shape), small_integers(rng, rhs_shape)
  out_shape = jax.eval_shape(lambda a, b: lax.dot_general(a, b, dims), lhs, rhs).shape
  weights = small_integers(rng, out_shape)  # The cotangent, exact in bfloat16 too.
  mixed = precision.mixed_dot_general('bfloat16')

  def loss(dot):
    return lambda a, b: jnp.sum(dot(a, b, dims) * weights)

  np.testing.assert_array_equal(mixed(lhs, rhs, dims), lax.dot_general(lhs, rhs, dims))
  expected = jax.grad(loss(lax.dot_general), (0, 1))(lhs, rhs)
  got = jax.jit(jax.grad(loss(mixed), (0, 1)))(lhs, rhs)
  for e, g in zip(expected, got):
    assert g.dtype == jnp.float32 and g.shape == e.shape
    np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize('lhs_shape,rhs_shape,dims', PRODUCTS)
def test_canonical_dot_equals_dot_general(lhs_shape, rhs_shape, dims):
  """The layout the CPU path reshapes every half-precision product into gives the same result."""
  rng = np.random.default_rng(2)
  lhs, rhs = small_integers(rng, lhs_shape), small_integers(rng, rhs_shape)
  got = jax.jit(precision.canonical_dot, static_argnums=2)(lhs, rhs, dims)
  np.testing.assert_array_equal(got, lax.dot_general(lhs, rhs, dims))


def _transposed_inputs(fn, *args):
  """Which of `fn`'s arguments its jaxpr transposes (moving a dimension of size > 1)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  moved = set()
  for eqn in jaxpr.eqns:
    perm = [d for d in eqn.params.get('permutation', ()) if eqn.invars[0].aval.shape[d] > 1]
    if eqn.primitive.name == 'transpose' and perm != sorted(perm) and eqn.invars[0] in jaxpr.invars:
      moved.add(jaxpr.invars.index(eqn.invars[0]))
  return moved


def test_canonical_dot_moves_the_narrower_operand():
  """A weight gradient g^T x contracts both operands' first axis, so one of them is transposed:
  the narrower one (x, 8 wide, not g, 32 wide), the small result transposed back instead; with
  equal widths `move_rhs_on_ties` moves the layer's input x (shared by query, key and value)."""
  g, x, wide_x = jnp.zeros((64, 32)), jnp.zeros((64, 8)), jnp.zeros((64, 32))
  dims = (((0,), (0,)), ((), ()))
  assert _transposed_inputs(lambda a, b: precision.canonical_dot(a, b, dims), g, x) == {1}
  assert _transposed_inputs(lambda a, b: precision.canonical_dot(a, b, dims), g, wide_x) == {0}
  tie = lambda a, b: precision.canonical_dot(a, b, dims, move_rhs_on_ties=True)  # noqa: E731
  assert _transposed_inputs(tie, g, wide_x) == {1}
  # A dense layer's forward product moves nothing.
  dense = (((1,), (0,)), ((), ()))
  assert not _transposed_inputs(lambda a, b: precision.canonical_dot(a, b, dense), x[:5], g[:8])
  for a, b_, d in ((g, x, dims), (g, wide_x, dims), (x[:5], g[:8], dense)):
    a, b_ = jnp.arange(a.size, dtype=jnp.float32).reshape(a.shape) % 7, b_ + 1
    np.testing.assert_array_equal(
      precision.canonical_dot(a, b_, d, move_rhs_on_ties=True), lax.dot_general(a, b_, d)
    )


def test_cpu_bfloat16_detection_can_be_overridden(monkeypatch):
  for value, expected in (('0', False), ('1', True)):
    monkeypatch.setenv('MIXER_VIT_CPU_BFLOAT16', value)
    precision.cpu_multiplies_bfloat16.cache_clear()
    assert precision.cpu_multiplies_bfloat16() is expected
  monkeypatch.delenv('MIXER_VIT_CPU_BFLOAT16')
  precision.cpu_multiplies_bfloat16.cache_clear()


def test_mixed_product_rounds_its_operands_to_bfloat16():
  lhs = jnp.array([[1.0 + 2.0**-10]])  # Not a bfloat16 number: rounds to 1.
  out = precision.mixed_dot_general('bfloat16')(lhs, jnp.ones((1, 1)), (((1,), (0,)), ((), ())))
  assert out.dtype == jnp.float32 and float(out[0, 0]) == 1.0


# (image side, kernel, stride, padding): the stem's 3x3 / 1x1 convolutions (odd sides, stride 2),
# a 7x7 root, patch embeddings (kernel == stride, sides not divisible), explicit padding.
CONVOLUTIONS = [
  (8, 3, 1, 'SAME'),
  (7, 3, 2, 'SAME'),
  (8, 1, 2, 'SAME'),
  (9, 7, 2, 'SAME'),
  (8, 4, 4, 'VALID'),
  (9, 2, 2, 'VALID'),
  (8, 3, 1, ((1, 1), (2, 0))),
  (17, 8, 8, 'VALID'),  # 64 taps: larger than other kernels may be, but a reshape.
]


def _conv(fn, stride, padding, **kwargs):
  return lambda a, b: fn(
    a, b, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), **kwargs
  )


def _conv_and_grads(conv, images, kernel, weights):
  grads = jax.jit(jax.grad(lambda a, b: jnp.sum(conv(a, b) * weights), (0, 1)))(images, kernel)
  return (jax.jit(conv)(images, kernel), *grads)


@pytest.mark.parametrize('side,size,stride,padding', CONVOLUTIONS)
def test_mixed_convolution_on_cpu_is_an_exact_patch_matmul(side, size, stride, padding):
  """On CPU the mixed convolution runs as `conv_as_matmul` (no convolution left in the program);
  on bfloat16 numbers it and both its gradients equal float32's exactly."""
  rng = np.random.default_rng(1)
  images, kernel = small_integers(rng, (2, side, side, 3)), small_integers(rng, (size, size, 3, 4))
  expected_conv = _conv(lax.conv_general_dilated, stride, padding)
  mixed_conv = _conv(precision.mixed_conv('bfloat16'), stride, padding)
  weights = small_integers(rng, jax.eval_shape(expected_conv, images, kernel).shape)
  if jax.default_backend() == 'cpu':
    assert 'conv_general_dilated' not in str(jax.make_jaxpr(mixed_conv)(images, kernel))
  expected = _conv_and_grads(expected_conv, images, kernel, weights)
  got = _conv_and_grads(mixed_conv, images, kernel, weights)
  for e, g in zip(expected, got):
    assert g.dtype == jnp.float32 and g.shape == e.shape
    np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize(
  'options,kernel_shape',
  [
    ({'rhs_dilation': (2, 2)}, (3, 3, 4, 4)),
    ({'feature_group_count': 2}, (3, 3, 2, 4)),
    ({}, (8, 8, 4, 4)),  # 64 taps at stride 1: too many copies of the image.
  ],
)
def test_mixed_convolution_falls_back_to_xla_and_rounds_its_backward_results(options, kernel_shape):
  """Dilated and grouped (and large-kernel) convolutions stay XLA's: the backward convolutions
  round their results to bfloat16 (8 significant bits)."""
  rng = np.random.default_rng(1)
  images, kernel = small_integers(rng, (2, 6, 6, 4)), small_integers(rng, kernel_shape)
  expected_conv = _conv(lax.conv_general_dilated, 1, 'SAME', **options)
  mixed_conv = _conv(precision.mixed_conv('bfloat16'), 1, 'SAME', **options)
  assert 'conv_general_dilated' in str(jax.make_jaxpr(mixed_conv)(images, kernel))
  weights = small_integers(rng, (2, 6, 6, 4))
  expected = _conv_and_grads(expected_conv, images, kernel, weights)
  got = _conv_and_grads(mixed_conv, images, kernel, weights)
  np.testing.assert_array_equal(got[0], expected[0])
  for e, g in zip(expected[1:], got[1:]):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, e, rtol=2.0**-8, atol=0)


def test_flax_conv_with_the_mixed_hook_equals_float32_on_bfloat16_numbers():
  """flax passes its own dimension numbers and padding; the patch embedding takes this path."""
  rng = np.random.default_rng(2)
  images = small_integers(rng, (2, 9, 9, 3))
  layer = lambda **kw: nn.Conv(5, (2, 2), strides=(2, 2), padding='VALID', **kw)
  params = jax.tree.map(
    lambda x: small_integers(rng, x.shape), layer().init(jax.random.PRNGKey(0), images)
  )
  mixed = layer(**precision.matmul_kwargs('bfloat16', conv=True))
  np.testing.assert_array_equal(mixed.apply(params, images), layer().apply(params, images))


def test_matmul_dtype_names():
  assert precision.to_matmul_dtype(None) is None
  assert precision.to_matmul_dtype('float32') is None
  assert precision.to_matmul_dtype('bfloat16') == jnp.bfloat16
  with pytest.raises(ValueError, match="matmul_dtype must be None, 'bfloat16' or 'float16'"):
    precision.to_matmul_dtype('int8')


MODELS = {
  'vit': ('testing', {}),
  'hybrid': (
    'ViT-Ti_16',
    {
      'image_size': (32, 32),
      'patches': {'size': (1, 1)},
      'resnet': {'num_layers': (1, 1), 'width_factor': 0.5},
      'hidden_size': 64,
      'transformer': {'num_layers': 2, 'mlp_dim': 128, 'num_heads': 2},
    },
  ),
  'mixer': ('testing-mixer', {}),
}


def _build(name, matmul_dtype=None, dtype='float32', **overrides):
  config = models.get_model_config(
    name, num_classes=10, matmul_dtype=matmul_dtype, dtype=dtype, **overrides
  )
  return config, models.build_model(config)


def _random_params(model, images):
  """Random parameters of `model`'s tree, drawn with numpy (flax's initialisers compile for
  seconds per model on 2 cores): kernels scaled by 1/sqrt(fan-in), norm scales near 1, and a
  non-zero head (it starts at zero), so the logits carry signal."""
  tree = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, images)['params'])
  rng = np.random.default_rng(7)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if 'scale' in jax.tree_util.keystr(path):
      return 1.0 + 0.1 * noise
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
    return noise / np.sqrt(fan_in)

  return jax.tree_util.tree_map_with_path(draw, tree), tree


@pytest.mark.parametrize('family', sorted(MODELS))
def test_mixed_precision_keeps_parameters_and_logits(family):
  """Same parameter names, shapes and float32 dtypes (so the same checkpoints); logits within
  bfloat16 rounding of float32, and closer to them than an all-bfloat16 model's.

  Tolerance: bfloat16 keeps 8 significant bits, so each operand is off by at most 2^-9 (0.2 %)
  relatively; over a few layers the logits drift by well under 2 % of their largest magnitude.
  """
  name, overrides = MODELS[family]
  config, reference = _build(name, **overrides)
  _, mixed = _build(name, 'bfloat16', **overrides)
  _, half = _build(name, dtype='bfloat16', **overrides)
  images = jax.random.uniform(
    jax.random.PRNGKey(0), (4, *config.image_size, 3), minval=-1.0, maxval=1.0
  )
  params, tree = _random_params(reference, images)
  mixed_tree = jax.eval_shape(lambda: mixed.init({'params': jax.random.PRNGKey(1)}, images))
  shapes = lambda tree: jax.tree.map(lambda v: (v.shape, v.dtype), tree)
  assert shapes(mixed_tree['params']) == shapes(tree)
  assert {v.dtype for v in jax.tree.leaves(mixed_tree)} == {np.dtype('float32')}
  apply = lambda model: jax.jit(model.apply)({'params': params}, images)
  expected, got = apply(reference), apply(mixed)
  assert got.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(expected)))
  mixed_error = float(jnp.max(jnp.abs(got - expected)))
  half_error = float(jnp.max(jnp.abs(apply(half) - expected)))
  assert 0 < mixed_error <= 0.02 * scale, (mixed_error, scale)
  assert mixed_error < half_error, (mixed_error, half_error)


@pytest.mark.parametrize('family', sorted(MODELS))
def test_mixed_precision_gradients_match_float32(family):
  """On CPUs with bfloat16 instructions this compiles every backward product natively in
  bfloat16 (`precision.canonical_dot`): XLA rejects any product it cannot fuse."""
  name, overrides = MODELS[family]
  config, reference = _build(name, **overrides)
  _, mixed = _build(name, 'bfloat16', **overrides)
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, *config.image_size, 3), minval=-1.0)
  params, _ = _random_params(reference, images)
  loss = lambda model: lambda p: jnp.sum(model.apply({'params': p}, images) ** 2)
  grad = lambda model: jax.jit(jax.grad(loss(model)))(params)
  expected, got = grad(reference), grad(mixed)
  assert {g.dtype for g in jax.tree.leaves(got)} == {np.dtype('float32')}
  # Relative to the largest gradient: some gradients are zero in exact arithmetic (the key bias:
  # softmax ignores a shift shared by all keys) and only rounding noise in either precision.
  scale = max(float(jnp.max(jnp.abs(e))) for e in jax.tree.leaves(expected))
  errors = jax.tree.map(lambda g, e: float(jnp.max(jnp.abs(g - e))), got, expected)
  # The hybrid's stem kernels get the gradients that passed through every bfloat16 product above
  # them, and GroupNorm and weight standardisation rescale them: measured 2.1 % there.
  tolerance = 0.03 if family == 'hybrid' else 0.02
  assert max(jax.tree.leaves(errors)) <= tolerance * scale, errors
