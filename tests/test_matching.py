"""The matcher against scipy's linear_sum_assignment, and DETR's cost against numpy."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from e2e_vlp.losses import matching

_BATCH = 200


def _costs(kind: str, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  if kind == 'uniform':
    return rng.random(shape)
  if kind == 'log_uniform':  # six orders of magnitude
    return 10.0 ** rng.uniform(-3, 3, shape)
  if kind == 'integer':  # many exact ties
    return rng.integers(0, 4, shape).astype(np.float64)
  if kind == 'signed':
    return rng.normal(size=shape) * 100 - 50
  raise ValueError(kind)


@functools.partial(jax.jit, static_argnames='method')
def _jit_match(cost, valid, method):
  return matching.match(cost, valid, method=method)


def _check_optimal(cost: np.ndarray, valid: np.ndarray, method: str) -> None:
  target_for_query, query_for_target = map(
      np.asarray, _jit_match(jnp.asarray(cost), jnp.asarray(valid), method))
  num_queries = cost.shape[1]
  for b in range(cost.shape[0]):
    cols = np.flatnonzero(valid[b])
    queries = query_for_target[b, cols]
    assert (query_for_target[b, ~valid[b]] == -1).all()
    assert (queries >= 0).all() and len(set(queries)) == len(cols), (b, queries)
    inverse = np.full(num_queries, -1)
    inverse[queries] = cols
    np.testing.assert_array_equal(target_for_query[b], inverse)
    sub = cost[b][:, cols].astype(np.float64)
    rows, picked = optimize.linear_sum_assignment(sub)
    best = sub[rows, picked].sum()
    ours = sub[queries, np.arange(len(cols))].sum()
    np.testing.assert_allclose(ours, best, rtol=1e-6, atol=1e-6, err_msg=f'example {b}')


# 6 x 200 = 1200 random problems; every case pads some targets, rows 0 and 1 of each batch
# are all padding and no padding.
OPTIMALITY_CASES = [
    ('uniform', 10, 10),  # square
    ('log_uniform', 30, 8),  # more queries than targets
    ('log_uniform', 12, 12),
    ('integer', 20, 20),
    ('integer', 9, 4),
    ('signed', 16, 7),
]


@pytest.mark.parametrize('seed', range(len(OPTIMALITY_CASES)))
def test_hungarian_is_optimal(seed):
  kind, num_queries, max_boxes = OPTIMALITY_CASES[seed]
  rng = np.random.default_rng(seed)
  cost = _costs(kind, rng, (_BATCH, num_queries, max_boxes)).astype(np.float32)
  valid = rng.random((_BATCH, max_boxes)) < 0.7
  valid[0], valid[1] = False, True
  _check_optimal(cost, valid, 'hungarian')


@pytest.mark.parametrize('padding', ['scattered', 'trailing'])
@pytest.mark.parametrize('backend', ['cpu', 'accelerator'])
def test_scipy_method_is_optimal(padding, backend, monkeypatch):
  """Both host paths: buffer_callback (CPU backend) and pure_callback (any other)."""
  if backend == 'accelerator':
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  rng = np.random.default_rng(1)
  cost = _costs('integer', rng, (50, 9, 5)).astype(np.float32)
  if padding == 'trailing':  # the data pipeline's layout: a view per example on the host
    valid = np.arange(5) < rng.integers(0, 6, (50, 1))
  else:
    valid = rng.random((50, 5)) < 0.6
  valid[0], valid[1] = False, True
  _check_optimal(cost, valid, 'scipy')


def test_scipy_method_calls_the_host_once_per_batch_also_under_vmap(monkeypatch):
  calls = []
  solve = matching._solve_on_host
  def counting(cost, *args):
    calls.append(cost.shape)
    solve(cost, *args)
  monkeypatch.setattr(matching, '_solve_on_host', counting)
  rng = np.random.default_rng(6)
  cost = rng.random((3, 4, 6, 4)).astype(np.float32)  # [V, B, Q, M]
  valid = rng.random((3, 4, 4)) < 0.7
  got = jax.jit(jax.vmap(functools.partial(matching.match, method='scipy')))(cost, valid)
  assert calls == [(3, 4, 6, 4)]
  for v in range(3):
    want = _jit_match(jnp.asarray(cost[v]), jnp.asarray(valid[v]), 'hungarian')
    np.testing.assert_allclose(matching.total_cost(cost[v], got[1][v]),
                               matching.total_cost(cost[v], want[1]), rtol=1e-6)
    assert (got[1][v] >= 0).sum() == valid[v].sum()


def test_padding_columns_do_not_change_the_optimum():
  """Padding an instance with invalid targets of any cost leaves the valid match optimal."""
  rng = np.random.default_rng(2)
  small = rng.random((_BATCH, 12, 5)).astype(np.float32)
  padding = (rng.random((_BATCH, 12, 7)) * 1e3).astype(np.float32)
  cost = np.concatenate([small, padding], -1)
  valid = np.concatenate([np.ones((_BATCH, 5), bool), np.zeros((_BATCH, 7), bool)], -1)
  _, padded = _jit_match(jnp.asarray(cost), jnp.asarray(valid), 'hungarian')
  _, unpadded = _jit_match(jnp.asarray(small), jnp.ones((_BATCH, 5), bool), 'hungarian')
  totals = [np.asarray(matching.total_cost(jnp.asarray(small), q[:, :5]))
            for q in (padded, unpadded)]
  np.testing.assert_allclose(totals[0], totals[1], rtol=1e-6)
  assert (np.asarray(padded)[:, 5:] == -1).all()


@pytest.mark.parametrize('method', matching.METHODS)
def test_no_gradient_flows_through_the_matcher(method):
  rng = np.random.default_rng(3)
  cost = jnp.asarray(rng.random((2, 5, 3)), jnp.float32)
  valid = jnp.asarray([[True, True, False], [True, False, True]])
  def loss(c):
    target_for_query, query_for_target = matching.match(c, valid, method=method)
    return (target_for_query.astype(jnp.float32).sum()
            + query_for_target.astype(jnp.float32).sum())
  grad = jax.jit(jax.grad(loss))(cost)
  np.testing.assert_array_equal(grad, np.zeros_like(cost))


@pytest.mark.parametrize('method', matching.METHODS)
def test_non_finite_costs_still_give_an_assignment(method):
  cost = jnp.asarray([[[np.nan, 1.0], [np.inf, 2.0], [0.5, -np.inf]]], jnp.float32)
  _, query_for_target = matching.match(cost, jnp.ones((1, 2), bool), method=method)
  assert sorted(np.asarray(query_for_target)[0].tolist()) in ([0, 2], [1, 2], [0, 1])


def test_rejects_fewer_queries_than_targets_and_unknown_method():
  with pytest.raises(ValueError, match='num_queries=3 < max_boxes=4'):
    matching.match(jnp.zeros((1, 3, 4)), jnp.ones((1, 4), bool))
  with pytest.raises(ValueError, match='matcher'):
    matching.match(jnp.zeros((1, 4, 2)), jnp.ones((1, 2), bool), method='greedy')


@pytest.mark.parametrize('axis_type', [jax.sharding.AxisType.Auto,
                                       jax.sharding.AxisType.Explicit])
def test_sharded_batch_is_solved_per_device(axis_type):
  """Under a context mesh each device solves its own examples: same result, no collective."""
  if jax.device_count() < 8:
    pytest.skip('needs the 8 virtual CPU devices that conftest.py sets up')
  rng = np.random.default_rng(4)
  cost = rng.random((16, 6, 4)).astype(np.float32)
  valid = rng.random((16, 4)) < 0.7
  want = _jit_match(jnp.asarray(cost), jnp.asarray(valid), 'hungarian')
  mesh = jax.make_mesh((4, 2, 1), ('data', 'fsdp', 'model'), axis_types=(axis_type,) * 3)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  for method in matching.METHODS:
    with jax.set_mesh(mesh):
      fn = jax.jit(functools.partial(matching.match, method=method), out_shardings=sharding)
      args = jax.device_put((cost, valid), sharding)
      got = fn(*args)
      hlo = fn.lower(*args).compile().as_text()
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
    assert not re.search(r'all-reduce|all-gather|all-to-all|collective-permute', hlo)


def test_detr_cost_matches_numpy():
  rng = np.random.default_rng(5)
  batch, num_queries, max_boxes, num_classes = 2, 4, 3, 5
  logits = rng.normal(size=(batch, num_queries, num_classes + 1)).astype(np.float32)
  pred = rng.uniform(0.1, 0.6, (batch, num_queries, 4)).astype(np.float32)
  boxes = rng.uniform(0.1, 0.6, (batch, max_boxes, 4)).astype(np.float32)
  labels = rng.integers(0, num_classes, (batch, max_boxes))
  cost_fn = jax.jit(functools.partial(matching.detr_cost, cost_class=1.0, cost_bbox=5.0,
                                      cost_giou=2.0))
  got = cost_fn(logits, pred, labels, boxes)

  def giou(a, b):  # cxcywh, one pair
    a = [a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2]
    b = [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]
    inter = (max(min(a[2], b[2]) - max(a[0], b[0]), 0)
             * max(min(a[3], b[3]) - max(a[1], b[1]), 0))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull

  want = np.zeros((batch, num_queries, max_boxes))
  for b in range(batch):
    for q in range(num_queries):
      p = np.exp(logits[b, q] - logits[b, q].max())
      p /= p.sum()
      for m in range(max_boxes):
        want[b, q, m] = (-p[labels[b, m]] + 5 * np.abs(pred[b, q] - boxes[b, m]).sum()
                         - 2 * giou(pred[b, q], boxes[b, m]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
