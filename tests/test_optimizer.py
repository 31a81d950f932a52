"""The optimizer's groups: learning-rate multipliers, frozen parameters, no-decay, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from e2e_vlp.train import optimizer


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
