"""The batched in-graph assignment solver against scipy's linear_sum_assignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from e2e_vlp.losses import assignment

_solve = jax.jit(assignment.assign_rows)


def _check(cost: np.ndarray, mask: np.ndarray, got: np.ndarray) -> None:
  for b in range(cost.shape[0]):
    rows = np.flatnonzero(mask[b])
    assert (got[b, ~mask[b]] == -1).all(), b
    cols = got[b, rows]
    assert (cols >= 0).all() and len(set(cols.tolist())) == len(rows), (b, cols)
    sub = cost[b, rows].astype(np.float64)
    r, c = optimize.linear_sum_assignment(sub)
    np.testing.assert_allclose(sub[np.arange(len(rows)), cols].sum(), sub[r, c].sum(),
                               rtol=1e-6, atol=1e-5, err_msg=f'example {b}')


@pytest.mark.parametrize('rows,cols,kind', [
    (1, 1, 'uniform'), (1, 7, 'uniform'), (9, 9, 'uniform'), (20, 60, 'uniform'),
    (12, 12, 'ties'), (8, 30, 'ties'), (10, 25, 'spread')])
def test_matches_scipy_on_every_row(rows, cols, kind):
  rng = np.random.default_rng(rows * 100 + cols)
  shape = (40, rows, cols)
  if kind == 'ties':  # few distinct values: many optimal assignments, exact-zero gaps
    cost = rng.integers(0, 3, shape).astype(np.float32)
  elif kind == 'spread':  # costs over six orders of magnitude, negative ones too
    cost = (10.0 ** rng.uniform(-3, 3, shape) * rng.choice([-1, 1], shape)).astype(np.float32)
  else:
    cost = rng.random(shape, np.float32)
  got = np.asarray(_solve(jnp.asarray(cost)))
  assert got.shape == (40, rows) and got.dtype == np.int32
  _check(cost, np.ones((40, rows), bool), got)


def test_the_search_undoes_a_greedy_start_that_is_not_optimal():
  """Both rows want column 0; the greedy start gives it to row 0 (1 + 10 = 11), the search
  for row 1 must move row 0 to column 1 (2 + 1 = 3)."""
  cost = jnp.asarray([[[1.0, 2.0, 50.0], [1.0, 10.0, 60.0]]])
  np.testing.assert_array_equal(np.asarray(_solve(cost)), [[1, 0]])


def test_masked_rows_are_left_out_and_the_rest_optimal():
  rng = np.random.default_rng(0)
  cost = rng.random((60, 15, 20), np.float32)
  mask = rng.random((60, 15)) < 0.5
  mask[0], mask[1] = False, True  # nothing to assign; everything
  # A masked row's costs change nothing, NaN included (the greedy start reads them).
  cost_with_nan = np.where(mask[:, :, None], cost, np.nan).astype(np.float32)
  got = np.asarray(_solve(jnp.asarray(cost_with_nan), jnp.asarray(mask)))
  assert (got[0] == -1).all()
  _check(cost, mask, got)


def test_trailing_rows_left_out_everywhere_are_skipped():
  """The rows after the last one any example assigns are skipped: as if they were absent."""
  rng = np.random.default_rng(3)
  cost = rng.random((8, 12, 20), np.float32)
  mask = np.zeros((8, 12), bool)
  mask[:, :5] = rng.random((8, 5)) < 0.7
  got = np.asarray(_solve(jnp.asarray(cost), jnp.asarray(mask)))
  alone = np.asarray(_solve(jnp.asarray(cost[:, :5]), jnp.asarray(mask[:, :5])))
  np.testing.assert_array_equal(got[:, :5], alone)
  assert (got[:, 5:] == -1).all()
  _check(cost, mask, got)
  none = np.asarray(_solve(jnp.asarray(cost), jnp.zeros((8, 12), bool)))
  assert (none == -1).all()


def test_each_problem_is_solved_as_if_alone():
  """The batch steps together; an example's answer must not depend on its neighbours."""
  rng = np.random.default_rng(1)
  cost = rng.integers(0, 5, (16, 10, 14)).astype(np.float32)
  together = np.asarray(_solve(jnp.asarray(cost)))
  alone = np.concatenate([np.asarray(_solve(jnp.asarray(cost[b:b + 1]))) for b in range(16)])
  np.testing.assert_array_equal(together, alone)


def test_more_rows_than_columns_is_an_error():
  with pytest.raises(ValueError, match='Transpose'):
    assignment.assign_rows(jnp.zeros((2, 5, 4)))


def test_non_finite_costs_end_the_loops():
  """NaN and inf break the search's order; every search and path walk must still end, in a
  full assignment (each row a distinct column), if not an optimal one."""
  rng = np.random.default_rng(2)
  cost = rng.random((40, 6, 8)).astype(np.float32)
  draw = rng.random(cost.shape)
  cost[draw < 0.2] = np.nan
  cost[(draw >= 0.2) & (draw < 0.3)] = np.inf
  cost[(draw >= 0.3) & (draw < 0.35)] = -np.inf
  cost[0] = np.nan
  cost[1, :, :4] = np.inf
  got = np.asarray(_solve(jnp.asarray(cost)))
  assert got.shape == (40, 6)
  for b in range(40):
    assert (got[b] >= 0).all() and len(set(got[b].tolist())) == 6, (b, got[b])
