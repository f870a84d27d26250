"""FSDP: the train state sharded over a (data, fsdp) mesh trains like pure data parallelism.

On the 8 fake CPU devices: pure data parallelism, fsdp=8 and fsdp=2 x data=4 give the same losses
and parameters, with and without gradient accumulation; the state really is sharded; a run
trained with fsdp=8 resumes on 4 devices with fsdp=2 as if never stopped; ``params.npz`` is the
gathered state. Also: the layout rules, the memory report and dry run, remat policies, ViT-g/14.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import compilation_cache_for_repeated_runs  # noqa: F401  (autouse: the cache)
from test_train import flat
from test_train import losses
from test_train import tiny_config

from mixer_vit import models
from mixer_vit import workdir as workdir_lib
from mixer_vit.models import params_io
from mixer_vit.runtime import parallel
from mixer_vit.training import memory
from mixer_vit.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]
P = jax.sharding.PartitionSpec
# The MLP's first kernel (32 x 512 = MIN_SHARDED_SIZE elements) is sharded by the default rule
# (its largest dimension), the attention kernels (32, 2, 16) and one bias by these rules; the rest
# is small and stays replicated.
RULES = (('(query|key|value)/kernel', ('fsdp',)), ('MlpBlock_3/Dense_0/bias', ('fsdp',)))
MLP = ('Transformer', 'encoderblock_0', 'MlpBlock_3', 'Dense_0')
QUERY = ('Transformer', 'encoderblock_0', 'MultiHeadDotProductAttention_1', 'query', 'kernel')
MESHES = (1, 8, 2)  # config.mesh.fsdp on 8 devices: pure data parallel, fsdp=8, data=4 x fsdp=2.
# The runs: every mesh without accumulation, pure data parallel and data=4 x fsdp=2 with.
RUNS = ((1, 1), (8, 1), (2, 1), (1, 2), (2, 2))


def fsdp_config(fsdp, **overrides):
  # SGD: Adam would magnify the float rounding of near-zero gradients (the sums over devices run
  # in another order on another mesh) into visible parameter differences.
  overrides = {'optimizer': 'sgd', 'lr': 0.1, 'checkpoint_every': 2, **overrides}
  config = tiny_config(total_steps=4, **overrides)
  config.model.transformer = {'num_layers': 1, 'mlp_dim': 512, 'num_heads': 2}
  config.mesh.fsdp = fsdp
  config.mesh.rules = RULES
  return config


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def assert_params_close(a, b):
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """``{(fsdp, accum_steps): (workdir, final state)}`` of 4 steps for each of ``RUNS``; the state
  is the one the loop hands to the checkpoint (the real train state, as laid out)."""
  saved, out = {}, {}
  real_save = workdir_lib.save_checkpoint

  def save(manager, step, state, force=False):
    saved['state'] = state
    return real_save(manager, step, state, force)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(workdir_lib, 'save_checkpoint', save)
    for fsdp, accum in RUNS:
      workdir = str(tmp_path_factory.mktemp(f'fsdp{fsdp}_accum{accum}'))
      train.train_and_evaluate(fsdp_config(fsdp, accum_steps=accum), workdir)
      out[fsdp, accum] = (workdir, saved.pop('state'))
  return out


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_fsdp_meshes_train_like_pure_data_parallelism(runs, accum_steps):
  reference, _ = runs[1, accum_steps]
  want = losses(reference)
  assert sorted(want) == [1, 2, 3, 4] and want[4] < want[1]
  for fsdp in [f for f, a in RUNS if a == accum_steps and f != 1]:
    workdir, _ = runs[fsdp, accum_steps]
    assert losses(workdir) == pytest.approx(want, rel=1e-5), fsdp
    assert_params_close(
      params_io.load_npz(os.path.join(workdir, 'params.npz')),
      params_io.load_npz(os.path.join(reference, 'params.npz')),
    )


@pytest.mark.parametrize('fsdp', MESHES)
def test_the_train_state_is_sharded_over_the_fsdp_axis(runs, fsdp):
  _, state = runs[fsdp, 1]
  assert dict(state.step.sharding.mesh.shape) == {'data': 8 // fsdp, 'fsdp': fsdp}
  kernel, bias = _get(state.params, (*MLP, 'kernel')), _get(state.params, (*MLP, 'bias'))
  query = _get(state.params, QUERY)
  moments = [
    leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    if parallel.path_name(path).endswith('/'.join(MLP) + '/kernel')
  ]
  assert len(moments) == 1  # SGD's momentum, laid out like the kernel.
  if fsdp == 1:
    for x in (kernel, bias, query, *moments):  # Whole on every device (rules or not).
      assert x.sharding.is_fully_replicated and x.addressable_shards[0].data.shape == x.shape
    return
  assert kernel.shape == (32, 512)
  for x in (kernel, *moments):
    assert x.sharding.spec == P(None, 'fsdp')  # The largest dimension.
    assert x.addressable_shards[0].data.shape == (32, 512 // fsdp)
  assert query.sharding.spec == P('fsdp') and query.addressable_shards[0].data.shape == (
    32 // fsdp,
    2,
    16,
  )
  assert bias.sharding.spec == P('fsdp') and bias.addressable_shards[0].data.shape == (512 // fsdp,)
  norm = state.params['Transformer']['encoder_norm']['scale']
  assert norm.sharding.spec == P() and state.step.sharding.spec == P()  # Small: replicated.
  # Each device holds 1/fsdp of every sharded leaf, most of the state.
  leaves = jax.tree.leaves(state)
  whole = sum(x.nbytes for x in leaves)
  sharded = sum(x.nbytes for x in leaves if x.sharding.spec != P())
  assert sharded > 0.8 * whole
  for device in range(8):
    held = sum(x.addressable_shards[device].data.nbytes for x in leaves)
    assert held == whole - sharded + sharded // fsdp


def test_params_npz_is_the_gathered_state(runs):
  workdir, state = runs[8, 1]
  npz = params_io.load_npz(os.path.join(workdir, 'params.npz'))
  gathered = parallel.to_host(state.params)
  for tree in (gathered, workdir_lib.load_workdir(workdir).params):
    a, b = flat(tree), flat(npz)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_fsdp8_run_resumes_on_four_devices_with_fsdp2(runs, tmp_path):
  full, _ = runs[8, 1]
  # The fsdp=8 run as if stopped after step 2: its checkpoint of step 2, written sharded.
  parts = tmp_path / 'parts'
  shutil.copytree(full, parts)
  shutil.rmtree(parts / 'checkpoints' / '4')
  (parts / 'params.npz').unlink()
  assert workdir_lib.checkpoint_steps(str(parts)) == [2]
  four = parallel.make_mesh(jax.devices()[:4], fsdp=2)
  second = train.train_and_evaluate(fsdp_config(2), str(parts), mesh=four)
  assert second['step'] == 4
  assert losses(parts) == pytest.approx(losses(full), rel=1e-5)
  assert_params_close(
    params_io.load_npz(os.path.join(parts, 'params.npz')),
    params_io.load_npz(os.path.join(full, 'params.npz')),
  )
  resumed = workdir_lib.read_history(parts)[-1]
  assert resumed['event'] == 'resume' and resumed['changes'] == {'mesh.fsdp': [8, 2]}


def test_a_mesh_that_does_not_match_the_config_is_refused(tmp_path):
  with pytest.raises(ValueError, match='config.mesh.fsdp'):
    train.train_and_evaluate(fsdp_config(8), str(tmp_path), mesh=parallel.make_mesh(fsdp=2))
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# The layout rules.


def test_default_layout_shards_the_largest_divisible_dimension():
  spec = parallel.default_spec
  assert spec((32, 512), 8) == P(None, 'fsdp')
  assert spec((512, 512), 8) == P(None, 'fsdp')  # Equal sizes: the last.
  assert spec((1000, 27), 8) == P('fsdp', None)
  assert spec((1001, 27), 8) == P()  # No dimension divides.
  assert spec((64, 200), 8) == P()  # Below MIN_SHARDED_SIZE.
  assert spec((4096, 4096), 1) == P()
  assert spec((), 8) == P()


def test_layout_rules_override_by_name_and_fail_clearly():
  mesh = parallel.make_mesh(fsdp=4)
  tree = {
    'params': {'head': {'kernel': jnp.zeros((64, 1024))}, 'b': {'kernel': jnp.zeros((64, 1024))}}
  }
  shardings = parallel.state_shardings(tree, mesh, [('head/kernel', ())])
  assert shardings['params']['head']['kernel'].spec == P()
  assert shardings['params']['b']['kernel'].spec == P(None, 'fsdp')
  rule = [('kernel', ('fsdp', None))]
  assert parallel.state_shardings(tree, mesh, rule)['params']['b']['kernel'].spec == P('fsdp', None)
  with pytest.raises(ValueError, match=r'config.mesh.rules.*\(None, .model.\)'):
    parallel.state_shardings(tree, mesh, [('head/kernel', (None, 'model'))])
  with pytest.raises(ValueError, match='config.mesh.rules.*not divisible'):
    parallel.state_shardings({'k': jnp.zeros((6, 1024))}, mesh, [('k', ('fsdp', None))])
  with pytest.raises(ValueError, match='config.mesh.rules.*regular expression'):
    parallel.state_shardings(tree, mesh, [('head/(kernel', ())])
  with pytest.raises(ValueError, match='config.mesh.fsdp=3'):
    parallel.make_mesh(fsdp=3)


def test_two_d_mesh_splits_the_batch_over_every_device():
  mesh = parallel.make_mesh(fsdp=2)
  local = {'image': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  batch = parallel.shard_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(batch['image']), local['image'])
  rows = {d: s.data.shape[0] for s in batch['image'].addressable_shards for d in [s.device]}
  assert len(rows) == 8 and set(rows.values()) == {2}
  # In jax.devices() order, as on the 1-D mesh: each process still feeds a contiguous slice.
  order = [
    s.device for s in sorted(batch['image'].addressable_shards, key=lambda s: s.index[0].start)
  ]
  assert order == jax.devices()


# ---------------------------------------------------------------------------------------------
# Memory before launch.


def test_memory_report_counts_the_sharded_state_and_the_batch():
  report = memory.train_step_memory(fsdp_config(8), 10, (8, 8, 3))
  assert report.fsdp == 8 and report.parameters == 39_050
  # Without fsdp each device holds parameters + SGD momentum (+ the step): 2 x 4 bytes each.
  assert report.state_bytes < 0.3 * (2 * 4 * report.parameters)
  # Arguments: the state's share and the batch's (4 images of 8x8x3 and 4 labels per device);
  # without dropout the key is unused, and jit drops it.
  batch = 4 * 8 * 8 * 3 * 4 + 4 * 10 * 4
  assert report.argument_bytes == report.state_bytes + batch
  assert report.alias_bytes == report.state_bytes  # The donated state is updated in place.
  assert report.total_bytes > report.argument_bytes


def test_memory_report_counts_the_ema_parameters():
  plain = memory.train_step_memory(fsdp_config(1), 10, (8, 8, 3))
  ema = memory.train_step_memory(fsdp_config(1, ema_decay=0.9), 10, (8, 8, 3))
  # SGD momentum + parameters, then a third float32 copy: the EMA.
  assert ema.state_bytes - plain.state_bytes == 4 * plain.parameters


def test_dry_run_prints_the_memory_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'mixer_vit.main',
      '--config=configs/digits.py:vit',
      f'--workdir={workdir}',
      '--dry_run',
      '--config.mesh.fsdp=8',
      f'--config.mesh.rules={RULES}',
      '--config.model.transformer.mlp_dim=512',
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'mesh data=1 x fsdp=8' in out.stdout and 'temporaries' in out.stdout, out.stdout
  assert 'at 8x8' in out.stdout  # The digits' image shape, read from the pipeline.
  assert not workdir.exists()


# ---------------------------------------------------------------------------------------------
# Models: remat policies, ViT-g/14.


@pytest.mark.parametrize('name', ['testing', 'testing-mixer'])
def test_remat_policies_keep_outputs_and_gradients(name):
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  plain = models.get_model(name)
  params = jax.jit(lambda: plain.init({'params': jax.random.key(0)}, x)['params'])()

  def loss_and_grads(model):
    loss = lambda p: jnp.sum(model.apply({'params': p}, x, train=True) ** 2)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)

  want_loss, want_grads = loss_and_grads(plain)
  # Each family once with a policy that keeps something (remat=True alone: test_models.py).
  keeping = 'dots_no_batch' if name == 'testing' else 'dots'
  for policy in (keeping, 'nothing'):
    loss, grads = loss_and_grads(models.get_model(name, remat=True, remat_policy=policy))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=policy)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=policy)


def test_remat_policy_is_checked():
  with pytest.raises(ValueError, match='remat_policy must be one of nothing, dots, dots_no_batch'):
    models.get_model_config('testing', remat=True, remat_policy='all')
  with pytest.raises(ValueError, match='needs remat=True'):
    models.get_model_config('testing', remat_policy='dots')


def test_vit_g14_has_a_billion_parameters():
  config = models.get_model_config('ViT-g_14')
  assert (config.hidden_size, config.transformer.num_layers) == (1408, 40)
  assert (config.transformer.mlp_dim, config.transformer.num_heads) == (6144, 16)
  assert config.patches.size == (14, 14)
  model = models.build_model(config)
  shapes = jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)))['params']
  )
  count = sum(x.size for x in jax.tree.leaves(shapes))
  assert 1.00e9 < count < 1.02e9, count  # 1011 M in "Scaling Vision Transformers".
