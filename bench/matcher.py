"""Benchmark: the batched DETR matcher against its peers, on DETR-like costs.

Peers, all solving the same B problems:
- e2e_vlp `match` with method 'hungarian' (in-graph: `e2e_vlp.losses.assignment`, the
  whole batch stepped at once) and 'scipy' (one host callback);
- optax's `hungarian_algorithm` under `jax.vmap` and under `lax.map`;
- scipy's `linear_sum_assignment` in a Python loop over the batch, as PyTorch DETR does
  (device-to-host copy included);
- scipy through a bare `jax.pure_callback`.

Prints a Markdown table of median milliseconds (after a warm-up, `block_until_ready`) and
the ratio to the scipy loop, and checks that every solver finds the same total cost.

Usage: python bench/matcher.py [--quick] [--repeats N]
"""

import argparse
import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy import optimize  # noqa: E402

from e2e_vlp.losses import matching  # noqa: E402

SIZES = ((100, 20), (100, 50), (300, 100))  # (num_queries, max_boxes)
QUICK_SIZES = ((100, 20),)
NUM_CLASSES = 91  # COCO's label space, as in DETR


def detr_like_problem(rng: np.random.Generator, batch: int, num_queries: int,
                      max_boxes: int) -> tuple[jax.Array, jax.Array]:
  """DETR's 1/5/2 cost of random predictions vs random targets; 1..M real targets each."""
  def random_boxes(n):
    return np.concatenate([rng.uniform(0.1, 0.9, (batch, n, 2)),
                           rng.uniform(0.02, 0.5, (batch, n, 2))], -1).astype(np.float32)
  logits = rng.normal(size=(batch, num_queries, NUM_CLASSES + 1)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (batch, max_boxes))
  cost = matching.detr_cost(jnp.asarray(logits), jnp.asarray(random_boxes(num_queries)),
                            jnp.asarray(labels), jnp.asarray(random_boxes(max_boxes)),
                            cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
  num_valid = rng.integers(1, max_boxes + 1, batch)
  valid = np.arange(max_boxes)[None, :] < num_valid[:, None]
  return jax.block_until_ready(cost), jnp.asarray(valid)


def _optax_one(cost: jax.Array) -> jax.Array:
  """One example -> `[M]` query per target (invalid columns must already be constant)."""
  queries, targets = optax.assignment.hungarian_algorithm(cost)
  return jnp.zeros(cost.shape[1], jnp.int32).at[targets].set(queries.astype(jnp.int32))


def _scipy_batch(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  # A callback receives jax.Arrays: index numpy copies, not them, inside the loop.
  cost, valid = np.asarray(cost, np.float64), np.asarray(valid)
  out = np.full(valid.shape, -1, np.int32)
  for b in range(cost.shape[0]):
    cols = np.flatnonzero(valid[b])
    queries, targets = optimize.linear_sum_assignment(cost[b][:, cols])
    out[b, cols[targets]] = queries
  return out


def solvers() -> dict[str, Callable[[jax.Array, jax.Array], np.ndarray | jax.Array]]:
  """name -> fn(cost, valid) -> `[B, M]` query per target (-1 for invalid)."""
  def padded(c, v):
    return jnp.where(v[:, None, :], c, 0.0)

  def masked(q, v):
    return jnp.where(v, q, -1)

  def scipy_loop(c, v):  # PyTorch DETR: copy the cost to the host, loop over images
    return _scipy_batch(c, v)

  def scipy_callback(c, v):
    return jax.pure_callback(_scipy_batch, jax.ShapeDtypeStruct(v.shape, jnp.int32), c, v,
                             vmap_method='broadcast_all')

  return {
      'e2e_vlp match (hungarian)': jax.jit(lambda c, v: matching.match(c, v, 'hungarian')[1]),
      'e2e_vlp match (scipy)': jax.jit(lambda c, v: matching.match(c, v, 'scipy')[1]),
      'optax, vmap': jax.jit(lambda c, v: masked(jax.vmap(_optax_one)(padded(c, v)), v)),
      'optax, lax.map': jax.jit(lambda c, v: masked(jax.lax.map(_optax_one, padded(c, v)), v)),
      'scipy loop (DETR)': scipy_loop,
      'scipy pure_callback': jax.jit(scipy_callback),
  }


def time_all(fns: dict[str, Callable], cost: jax.Array, valid: jax.Array,
             repeats: int) -> dict[str, tuple[float, np.ndarray]]:
  """name -> (median ms, output). Repeats interleave the solvers so that a busy host slows
  them all alike."""
  outputs = {name: np.asarray(jax.block_until_ready(fn(cost, valid)))  # warm-up, compile
             for name, fn in fns.items()}
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(cost, valid))
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: (statistics.median(times[name]), outputs[name]) for name in fns}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='one small size, few repeats')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--batch', type=int, default=64)
  args = parser.parse_args()
  sizes = QUICK_SIZES if args.quick else SIZES
  repeats = args.repeats or (3 if args.quick else 10)
  rng = np.random.default_rng(0)
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'batch {args.batch}, median of {repeats} interleaved runs after warm-up\n')

  fns = solvers()
  header = '| solver | ' + ' | '.join(f'{q}x{m} ms (vs scipy loop)' for q, m in sizes) + ' |'
  rows = {name: [] for name in fns}
  for num_queries, max_boxes in sizes:
    cost, valid = detr_like_problem(rng, args.batch, num_queries, max_boxes)
    results = time_all(fns, cost, valid, repeats)
    totals = {name: np.asarray(matching.total_cost(cost, jnp.asarray(out)))
              for name, (_, out) in results.items()}
    reference = totals['scipy loop (DETR)']
    for name, total in totals.items():
      if not np.allclose(total, reference, rtol=1e-5, atol=1e-4):
        raise AssertionError(f'{name} found a different total cost at {num_queries}x'
                             f'{max_boxes}: max gap {np.abs(total - reference).max()}')
    base = results['scipy loop (DETR)'][0]
    for name, (ms, _) in results.items():
      rows[name].append(f'{ms:.1f} ({ms / base:.2f}x)')
  print(header)
  print('|---' * (len(sizes) + 1) + '|')
  for name, cells in rows.items():
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
  print('\nAll solvers found the same total cost on every example.')


if __name__ == '__main__':
  main()
