"""Checkpoints: round trip with data state, fallback past a corrupt newest step."""

import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import pretrain
from e2e_vlp.train import checkpoint as ckpt_lib
from e2e_vlp.train import mesh as mesh_lib
from e2e_vlp.train import sharding
from e2e_vlp.train import state as state_lib
from micro import ToyModel


def _setup(mesh_config=None):
  mesh = mesh_lib.make_mesh(mesh_config or {'data': -1, 'fsdp': 1, 'model': 1})
  rules = sharding.logical_axis_rules('fsdp')
  model = ToyModel()
  init = lambda rng: model.init(rng, jnp.zeros((1, 8)))
  optim = pretrain.get_config('tiny').optim
  tx, schedule, abstract, shardings = state_lib.plan_train_state(init, optim, 10, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = state_lib.create_train_state(init, tx, jax.random.key(1), shardings)
  return mesh, model, tx, schedule, abstract, shardings, state


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_state_is_created_sharded_including_scalars():
  mesh, _, _, _, _, shardings, state = _setup({'data': 2, 'fsdp': 4, 'model': 1})
  kernel = state.params['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
  assert state.step.sharding.mesh.shape == mesh.shape
  # Adam's moments follow the parameter's sharding.
  mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
  assert any(getattr(m, 'mu', None) is not None and
             m.mu['kernel'].sharding.spec == kernel.sharding.spec for m in mu)


def test_round_trip_and_fallback_past_a_truncated_newest_step(tmp_path):
  _, _, _, _, abstract, shardings, state = _setup()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(1, state, ckpt_lib.DataState(b'data-at-1'), force=True)
  later = state.replace(step=state.step + 1,
                        params=jax.tree.map(lambda p: p + 1.0, state.params))
  ckpt.save(2, later, ckpt_lib.DataState(b'data-at-2', stream_start=1), force=True)
  ckpt.wait()
  target = ckpt_lib.abstract_with_shardings(abstract, shardings)

  step, restored, data = ckpt.restore_latest(target)
  assert (step, data) == (2, ckpt_lib.DataState(b'data-at-2', stream_start=1))
  _assert_trees_equal(restored.params, later.params)

  # Truncate every array file of the newest step: restore must fall back to step 1.
  newest = os.path.join(str(tmp_path), 'checkpoints', '2', 'state')
  truncated = 0
  for root, _, files in os.walk(newest):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 0 and not name.endswith('.json'):
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
        truncated += 1
  assert truncated
  step, restored, data = ckpt.restore_latest(target)
  assert (step, data) == (1, ckpt_lib.DataState(b'data-at-1', stream_start=0))
  _assert_trees_equal(restored.params, state.params)
  ckpt.close()


def _save_counting_compiles(directory, tree, min_bytes, caplog) -> int:
  """Saves `tree` with `Checkpointer(replica_parallel_min_bytes=min_bytes)`, checks the
  round trip and returns how many programs jax compiled while saving."""
  ckpt = ckpt_lib.Checkpointer(str(directory), keep=1, async_save=False,
                               replica_parallel_min_bytes=min_bytes)
  caplog.clear()
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      ckpt.save(0, tree, force=True)
  finally:
    jax.config.update('jax_log_compiles', False)
  compiles = sum('Compiling' in r.getMessage() for r in caplog.records)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)
  _assert_trees_equal(ckpt.restore(0, target)[0], tree)
  ckpt.close()
  return compiles


def test_small_replicated_arrays_are_saved_without_per_device_slice_compiles(
    tmp_path, caplog):
  # orbax's replica-parallel save slices each replicated array once per device, and every
  # new (shape, device) compiles a program; below the floor one replica writes it whole.
  # Shapes unique to this test, so no earlier compile is cached.
  replicated = jax.sharding.NamedSharding(jax.make_mesh((8,), ('data',)),
                                          jax.sharding.PartitionSpec())
  put = lambda shape: jax.device_put(
      np.arange(np.prod(shape), dtype=np.float32).reshape(shape), replicated)
  small, big = {'bias': put((8, 129))}, {'embedding': put((1024, 2049))}  # 4 KiB, 8 MiB
  assert _save_counting_compiles(tmp_path / 'a', small, 1 << 20, caplog) == 0
  assert _save_counting_compiles(tmp_path / 'b', big, 1 << 20, caplog) > 0  # 1 MiB slices
  assert _save_counting_compiles(tmp_path / 'c', {'bias': put((8, 131))}, 0, caplog) > 0


def test_nonfinite_step_leaves_state_unchanged():
  mesh, model, tx, schedule, _, shardings, state = _setup()

  def loss_fn(params, constants, batch, rng):
    del rng
    out = model.apply({'params': params, **constants}, batch['x'])
    loss = jnp.mean(out ** 2)
    return loss, {'toy_loss': loss}

  step = state_lib.make_train_step(loss_fn, tx, schedule)
  spec = {'x': jax.ShapeDtypeStruct((8, 8), jnp.float32)}
  jitted = state_lib.jit_train_step(step, shardings, mesh, spec)
  good = mesh_lib.global_batch({'x': np.ones((8, 8), np.float32)}, mesh)
  bad = mesh_lib.global_batch({'x': np.full((8, 8), np.nan, np.float32)}, mesh)
  before = jax.device_get(state)
  state, metrics = jitted(state, bad)
  after = jax.device_get(state)
  _assert_trees_equal(after.params, before.params)
  _assert_trees_equal(after.opt_state, before.opt_state)
  assert int(metrics['nonfinite']) == 1 and int(after.skipped) == 1 and int(after.step) == 1
  for _ in range(2):  # the warm-up schedule gives the first applied update lr 0
    state, metrics = jitted(state, good)
    assert int(metrics['nonfinite']) == 0
  assert not np.array_equal(jax.device_get(state.params['kernel']), before.params['kernel'])
