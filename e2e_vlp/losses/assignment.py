"""Exact linear assignment for a batch of problems at once, in the XLA graph.

The shortest-augmenting-path method of Jonker and Volgenant in the form scipy's
`linear_sum_assignment` uses (Crouse, "On implementing 2D rectangular assignment
algorithms", IEEE TAES 2016): the rows are added one at a time; each finds the cheapest
augmenting path to a free column by Dijkstra's method on the reduced costs, then the dual
potentials are updated so that every reduced cost stays non-negative and the matched ones
zero, which makes the final assignment optimal.

Every step runs on the whole batch at once (each array has a leading batch axis), with
gathers along one axis and masked selects where a per-example solver would index or
scatter: an example that has finished its search idles through the batch's remaining
steps. Such a loop is bound by the number of operations it launches per step (XLA:CPU's
thunks, an accelerator's kernels), not by their size, so a whole batch costs about what
one example does. `optax.assignment.hungarian_algorithm`, which this project used before,
solves one example at a time (under `lax.map`) or scatters into batched arrays (under
`vmap`): B=64 DETR-like problems of 100 queries x 50 targets took 51 ms with it under
`lax.map` against 3.0 ms with this solver, 2.1 ms for scipy in a Python loop
(`python bench/matcher.py`, 2-core AMD EPYC, 2026-12-07).
"""

import jax
import jax.numpy as jnp


def _pick(values: jax.Array, index: jax.Array) -> jax.Array:
  """values [B, N], index [B] -> [B]: values[b, index[b]]."""
  return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]


def _put(values: jax.Array, index: jax.Array, new: jax.Array, where: jax.Array
         ) -> jax.Array:
  """values [B, N] with values[b, index[b]] = new[b] where `where[b]` ([B] each)."""
  hit = where[:, None] & (jnp.arange(values.shape[1]) == index[:, None])
  return jnp.where(hit, new[:, None], values)


def assign_rows(cost: jax.Array, row_mask: jax.Array | None = None) -> jax.Array:
  """Minimum-cost assignment of every (unmasked) row to a distinct column, per problem.

  Args:
    cost: `[B, N, M]` finite costs, N <= M. (Non-finite ones give an arbitrary answer;
      `matching.match` replaces them first.)
    row_mask: `[B, N]` bool, the rows to assign (default all). A row whose mask is
      False is left out: never added, so it costs no steps and its costs are never read;
      the other rows get the optimum over them alone.

  Returns:
    `[B, N]` int32: the column assigned to each row, -1 for the rows left out. The total
    cost is minimal (the same as scipy's `linear_sum_assignment` on the rows assigned, up
    to float32 rounding of the duals).
  """
  batch, num_rows, num_cols = cost.shape
  if num_rows > num_cols:
    raise ValueError(f'assign_rows needs no more rows than columns (N <= M); got cost '
                     f'{cost.shape}. Transpose the problem.')
  cost = cost.astype(jnp.float32)
  if row_mask is None:
    row_mask = jnp.ones((batch, num_rows), bool)
  rows = jnp.arange(num_rows)
  cols = jnp.arange(num_cols)
  col_keys = cols.astype(jnp.float32)  # exact below 2^24 columns

  def add_row(current: int, state):
    u, v, row4col, col4row = state
    adding = row_mask[:, current]  # [B]; the others idle with a finished search
    # Dijkstra from row `current` over the columns, on reduced costs c - u - v >= 0.
    search = dict(
        shortest=jnp.full((batch, num_cols), jnp.inf, jnp.float32),
        path=jnp.zeros((batch, num_cols), jnp.int32),  # the row each column is reached from
        scanned_rows=jnp.zeros((batch, num_rows), bool),
        scanned_cols=jnp.zeros((batch, num_cols), bool),
        min_val=jnp.zeros((batch,), jnp.float32),
        row=jnp.full((batch,), current, jnp.int32),
        sink=jnp.where(adding, -1, 0).astype(jnp.int32),
        steps=jnp.zeros((), jnp.int32))

    # Each step scans a row not scanned before, so a search ends within N steps and a path
    # has at most N rows. The caps only bind on non-finite costs (NaN breaks Dijkstra's
    # order), which then give an arbitrary answer instead of a loop that never ends.
    def searching(s):
      return jnp.any(s['sink'] < 0) & (s['steps'] < num_rows)

    def scan_row(s):
      active = s['sink'] < 0
      row = s['row']
      scanned_rows = s['scanned_rows'] | (active[:, None] & (rows == row[:, None]))
      row_cost = jnp.take_along_axis(cost, row[:, None, None], axis=1)[:, 0]
      reduced = s['min_val'][:, None] + row_cost - _pick(u, row)[:, None] - v
      better = active[:, None] & ~s['scanned_cols'] & (reduced < s['shortest'])
      path = jnp.where(better, row[:, None], s['path'])
      shortest = jnp.where(better, reduced, s['shortest'])
      # The closest unscanned column; among equals a free one, which ends the search. Its
      # index is the smallest key (a free column's key is its index, a taken one's index +
      # M): on XLA:CPU a min costs ~1 us per step where argmin's variadic reduction
      # costs ~17 us.
      remaining = jnp.where(s['scanned_cols'], jnp.inf, shortest)
      lowest = remaining.min(axis=1)
      key = jnp.where(remaining == lowest[:, None],
                      jnp.where(row4col < 0, col_keys, col_keys + num_cols), 2 * num_cols)
      col = (key.min(axis=1) % num_cols).astype(jnp.int32)
      owner = _pick(row4col, col)
      return dict(
          shortest=shortest, path=path, scanned_rows=scanned_rows,
          scanned_cols=s['scanned_cols'] | (active[:, None] & (cols == col[:, None])),
          min_val=jnp.where(active, lowest, s['min_val']),
          row=jnp.where(active & (owner >= 0), owner, row),
          sink=jnp.where(active & (owner < 0), col, s['sink']),
          steps=s['steps'] + 1)

    s = jax.lax.while_loop(searching, scan_row, search)
    min_val, shortest = s['min_val'][:, None], s['shortest']
    # Duals: the scanned rows and columns move by how much closer than the sink they were.
    matched_cost = jnp.take_along_axis(shortest, jnp.maximum(col4row, 0), axis=1)
    u = u + jnp.where((rows == current) & adding[:, None], min_val,
                      jnp.where(s['scanned_rows'], min_val - matched_cost, 0.0))
    v = v - jnp.where(s['scanned_cols'], min_val - shortest, 0.0)

    # Augment: flip the matched and unmatched edges along the path back from the sink.
    def flipping(a):
      _, _, active, _, steps = a
      return jnp.any(active) & (steps < num_rows)

    def flip(a):
      row4col, col4row, active, col, steps = a
      row = _pick(s['path'], col)
      row4col = _put(row4col, col, row, active)
      previous = _pick(col4row, row)
      col4row = _put(col4row, row, col, active)
      return row4col, col4row, active & (row != current), previous, steps + 1

    row4col, col4row, _, _, _ = jax.lax.while_loop(
        flipping, flip, (row4col, col4row, adding, jnp.maximum(s['sink'], 0),
                         jnp.zeros((), jnp.int32)))
    return u, v, row4col, col4row

  state = (jnp.zeros((batch, num_rows), jnp.float32), jnp.zeros((batch, num_cols), jnp.float32),
           jnp.full((batch, num_cols), -1, jnp.int32), jnp.full((batch, num_rows), -1, jnp.int32))
  _, _, _, col4row = jax.lax.fori_loop(0, num_rows, add_row, state)
  return col4row
