"""The optimizer's groups: learning-rate multipliers, frozen parameters, no-decay, schedule."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import pretrain
from e2e_vlp.train import optimizer
from e2e_vlp.train import state as state_lib


def _optim(**overrides):
  optim = pretrain.get_config('tiny').optim
  optim.unlock()
  optim.update(dict(lr=0.01, warmup_steps=0, schedule='constant', clip_norm=0.0,
                    weight_decay=0.0, lr_mults=(), frozen=()))
  optim.update(overrides)
  return optim


def _params():
  return {'backbone': {'conv1': {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones((3,))},
                       'layer2_0': {'kernel': jnp.ones((3, 3))}},
          'encoder': {'dense': {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones((3,))}}}


def _one_update(optim, params, grads):
  tx, _ = optimizer.make_optimizer(optim, params, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_lr_multipliers_and_frozen_groups():
  optim = _optim(lr_mults=(('backbone/.*', 0.1),), frozen=(r'backbone/conv1/.*',))
  params = _params()
  grads = jax.tree.map(lambda p: 2.0 * jnp.ones_like(p), params)
  updates = _one_update(optim, params, grads)
  # Adam's first step moves every coordinate by lr * g/|g| (eps aside).
  np.testing.assert_allclose(updates['encoder']['dense']['kernel'], -0.01, rtol=1e-5)
  np.testing.assert_allclose(updates['backbone']['layer2_0']['kernel'], -0.001, rtol=1e-5)
  np.testing.assert_array_equal(updates['backbone']['conv1']['kernel'], 0.0)
  np.testing.assert_array_equal(updates['backbone']['conv1']['bias'], 0.0)


def test_weight_decay_skips_biases_and_norms():
  optim = _optim(weight_decay=0.5)
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = _one_update(optim, params, zeros)
  np.testing.assert_allclose(updates['encoder']['dense']['kernel'], -0.01 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates['encoder']['dense']['bias'], 0.0)


def test_frozen_gradients_do_not_count_in_the_clipping_norm():
  optim = _optim(clip_norm=1.0, frozen=(r'backbone/.*',), schedule='constant')
  params = {'backbone': {'kernel': jnp.ones((2,))}, 'head': {'kernel': jnp.ones((2,))}}
  grads = {'backbone': {'kernel': jnp.full((2,), 1e6)}, 'head': {'kernel': jnp.full((2,), 0.1)}}
  tx, _ = optimizer.make_optimizer(optim, params, total_steps=10)
  state = tx.init(params)
  # With the frozen gradient excluded the head gradient (norm 0.14) is not clipped; the
  # second moment then equals (1 - b2) * g^2 of the unclipped gradient.
  _, state = tx.update(grads, state, params)
  nu = [s for s in jax.tree.leaves(state) if getattr(s, 'shape', None) == (2,)]
  assert any(np.allclose(n, (1 - optim.b2) * 0.01, rtol=1e-5) for n in nu)


def test_warmup_then_cosine_schedule():
  optim = _optim(lr=1.0, warmup_steps=10, schedule='cosine', end_lr_factor=0.1)
  schedule = optimizer.learning_rate_schedule(optim, total_steps=110)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1.0, rtol=1e-6)
  # Halfway through the decay: 0.1 + 0.9 * (1 + cos(pi/2)) / 2 = 0.55.
  np.testing.assert_allclose(schedule(60), 0.55, rtol=1e-5)
  np.testing.assert_allclose(schedule(110), 0.1, rtol=1e-5)


def test_unknown_schedule_names_the_field():
  with pytest.raises(ValueError, match='config.optim.schedule'):
    optimizer.learning_rate_schedule(_optim(schedule='exp'), total_steps=10)


def _random_tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32),
                      _params())


@pytest.mark.parametrize('clip_norm', [0.0, 0.5, 100.0])  # none, clipping, not reached
def test_fused_update_matches_the_optax_chain(clip_norm):
  optim = dict(lr=0.01, warmup_steps=2, schedule='cosine', clip_norm=clip_norm,
               weight_decay=0.1, lr_mults=(('backbone/layer2_0/.*', 0.1),),
               frozen=(r'backbone/conv1/.*',))
  params = _random_tree(0)
  txs = {fused: optimizer.make_optimizer(_optim(fused_update=fused, **optim), params,
                                         total_steps=10)[0] for fused in (False, True)}
  updates = {}
  for fused, tx in txs.items():
    p, state = params, tx.init(params)
    for step in range(4):
      grads = _random_tree(step + 1)
      u, state = jax.jit(tx.update)(grads, state, p)
      p = optax.apply_updates(p, u)
    updates[fused] = (p, state)
  (chain_params, chain_state), (fused_params, fused_state) = updates[False], updates[True]
  assert jax.tree.structure(chain_state) == jax.tree.structure(fused_state)
  for got, want in zip(jax.tree.leaves(fused_state), jax.tree.leaves(chain_state)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)  # rounding apart
  for got, want, before in zip(jax.tree.leaves(fused_params), jax.tree.leaves(chain_params),
                               jax.tree.leaves(params)):
    # Parameters moved by lr ~0.01 per step: compare the moves.
    np.testing.assert_allclose(got - before, want - before, rtol=1e-5, atol=1e-9)
  frozen = fused_params['backbone']['conv1']
  np.testing.assert_array_equal(frozen['kernel'], params['backbone']['conv1']['kernel'])


@pytest.mark.parametrize('fused', [False, True])
def test_update_keeps_the_state_where_not_finite(fused):
  optim = _optim(fused_update=fused, clip_norm=1.0, weight_decay=0.1)
  params = _random_tree(0)
  tx, _ = optimizer.make_optimizer(optim, params, total_steps=10)
  state = jax.jit(tx.update)(_random_tree(1), tx.init(params), params)[1]
  grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _random_tree(2))
  _, kept = jax.jit(tx.update)(grads, state, params, finite=jnp.asarray(False))
  for got, want in zip(jax.tree.leaves(kept), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, want)
  _, moved = jax.jit(tx.update)(_random_tree(2), state, params, finite=jnp.asarray(True))
  assert int(moved[2].count) == int(state[2].count) + 1


def _moment_copies(fused):
  """Copies of moment-shaped buffers in the compiled step of a [256, 256] kernel."""
  params = {'encoder': {'kernel': jnp.ones((256, 256)), 'bias': jnp.ones((256,))}}
  optim = _optim(fused_update=fused, clip_norm=1.0, weight_decay=0.1)
  tx, schedule = optimizer.make_optimizer(optim, params, total_steps=10)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, constants={},
                               opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
  loss_fn = lambda p, c, b, r: (jnp.sum(p['encoder']['kernel'] * b['x']), {})
  step = state_lib.make_train_step(loss_fn, tx, schedule)
  hlo = jax.jit(step, donate_argnums=(0,)).lower(
      state, {'x': jnp.ones((256, 256))}).compile().as_text()
  return len(re.findall(r'= f32\[256,256\]\{1,0\} copy\(', hlo))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU fusion work-around')
def test_fused_update_is_done_in_place_by_xla_cpu():
  # The chain's form makes XLA:CPU copy both moments before the in-place writes.
  assert _moment_copies(False) >= 2
  assert _moment_copies(True) == 0


def test_train_step_needs_an_optimizer_that_takes_finite():
  with pytest.raises(TypeError, match='keep_state_unless_finite'):
    state_lib.make_train_step(lambda *a: (0.0, {}), optax.adam(1e-3), None)


@pytest.mark.parametrize('backend,stored', [('cpu', True), ('gpu', False), ('tpu', False)])
def test_fused_update_stores_the_moments_only_on_the_cpu_backend(monkeypatch, backend,
                                                                   stored):
  """The XLA:CPU work-around (`materialized`, a divide per moment) stays out of GPU and TPU
  graphs."""
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  params = _params()
  tx, _ = optimizer.make_optimizer(_optim(fused_update=True, clip_norm=1.0), params,
                                   total_steps=10)
  jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
  assert ('custom_jvp_call' in jaxpr) == stored
