"""Batched optimal bipartite matching of object queries to target boxes, inside `jit`.

Two interchangeable solvers, chosen by `config.loss.det.matcher`:
- 'hungarian': an exact shortest-augmenting-path solver in the XLA graph that steps the
  whole batch at once (`e2e_vlp.losses.assignment`), for accelerators, where a host
  matcher stalls the device (facebookresearch/detr#150), and for CPUs alike.
- 'scipy': `scipy.optimize.linear_sum_assignment` (float64, the solver PyTorch DETR uses)
  on the host, in ONE callback for the whole (per-device) batch. On the CPU backend the
  callback is `buffer_callback`, which hands the host XLA's own buffers and takes the
  answer in place (~0.01 ms per call against ~0.15 ms for `pure_callback`'s copies); on
  other backends `pure_callback` copies to and from the device. Each example is solved on
  its valid columns only (a view when the padding is trailing), transposed so that the
  solver's rows are the targets. bench/matcher.py, B=64, 100x50, 2-core host (the full
  run of 2026-12-07 14:59): 0.76x scipy in a Python loop, but 1.4x the in-graph solver
  (0.03x optax's). scipy releases the GIL, but splitting the batch over two threads
  measured no faster on that host, so one thread solves the batch.

Padded targets ('hungarian'): the solver never adds them (its row mask), so they cost no
steps and cannot disturb the valid targets' optimum. (A huge padding cost instead would do
the same in exact arithmetic, but in float32 it swamps the real costs in the dual
potentials and gives suboptimal matches: seen with 1e4 under optax's solver, which this
project used before.)

Sharding: under `jax.set_mesh(mesh)` the batch is split over the devices with
`jax.shard_map`, so each device solves its own examples and no collective runs inside the
solver's loops. Without a context mesh XLA gathers a sharded batch before the loops.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import buffer_callback
from scipy import optimize

from e2e_vlp.losses import assignment
from e2e_vlp.losses import boxes as box_ops

METHODS = ('hungarian', 'scipy')
# Replaces NaN/inf costs: large enough to be avoided, small enough to keep float32 duals exact
# to ~1e-1, so a broken prediction cannot make the solver loop on inf - inf.
_COST_LIMIT = 1e6


def match(cost: jax.Array, valid: jax.Array,
          method: str = 'hungarian') -> tuple[jax.Array, jax.Array]:
  """Minimum-cost assignment of every valid target to a distinct query, per example.

  Args:
    cost: `[B, Q, M]` cost of giving target m to query q.
    valid: `[B, M]` bool, which targets are real (the rest is padding).
    method: 'hungarian' (in-graph) or 'scipy' (host callback).

  Returns:
    target_for_query: `[B, Q]` int32, the target matched to each query, -1 if none.
    query_for_target: `[B, M]` int32, the query matched to each target, -1 for padding.
    Both are constants for autodiff (wrapped in `lax.stop_gradient`).
  """
  if cost.ndim != 3 or valid.shape != (cost.shape[0], cost.shape[2]):
    raise ValueError(
        f'match expects cost [B, Q, M] and valid [B, M]; got cost {cost.shape} and valid '
        f'{valid.shape}.')
  batch, num_queries, max_boxes = cost.shape
  if num_queries < max_boxes:
    raise ValueError(
        f'Every target needs its own query, but num_queries={num_queries} < '
        f'max_boxes={max_boxes}; raise config.model.num_queries or lower '
        'config.data.max_boxes.')
  if method not in METHODS:
    raise ValueError(f'Unknown matcher {method!r}; set config.loss.det.matcher to one of '
                     f'{METHODS}.')
  valid = valid.astype(bool)
  if max_boxes == 0:
    empty = jnp.full((batch, num_queries), -1, jnp.int32)
    return empty, jnp.zeros((batch, 0), jnp.int32)
  cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
  if method == 'scipy':
    return jax.lax.stop_gradient(_per_device(_scipy, cost, valid))
  query_for_target = _per_device(_hungarian, cost, valid)
  return jax.lax.stop_gradient((_invert(query_for_target, num_queries), query_for_target))


def _invert(query_for_target: jax.Array, num_queries: int) -> jax.Array:
  """`[B, M]` query per target (-1: none) -> `[B, Q]` target per query (-1: none)."""
  # A comparison rather than a scatter: O(B Q M) is tiny and it keeps the batch sharding.
  hit = query_for_target[:, None, :] == jnp.arange(num_queries, dtype=jnp.int32)[:, None]
  return jnp.where(hit.any(-1), jnp.argmax(hit, axis=-1), -1).astype(jnp.int32)


def _per_device(solve: Callable[[jax.Array, jax.Array], Any], cost: jax.Array,
                valid: jax.Array) -> Any:
  """Runs `solve` (batch-major outputs) on each device's slice of the batch when a context
  mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return solve(cost, valid)
  if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    axes = jax.typeof(cost).sharding.spec[0]  # the batch's own sharding: no resharding
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  else:
    # Automatic axes: split over every mesh axis, in order, that still divides the batch
    # (splitting an axis the batch is replicated over is a free local slice).
    axes = []
    for name in mesh.axis_names:
      if cost.shape[0] % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[name]) == 0:
        axes.append(name)
    axes = tuple(axes)
  num_shards = math.prod(mesh.shape[a] for a in axes)
  if num_shards == 1 or cost.shape[0] % num_shards:
    return solve(cost, valid)
  spec = jax.sharding.PartitionSpec(axes)
  # check_vma=False: the solver's loops start from unvarying constants, which the
  # varying-axes checker rejects; the body is purely per example, so nothing is lost.
  return jax.shard_map(solve, in_specs=(spec, spec), out_specs=spec,
                       check_vma=False)(cost, valid)


def _hungarian(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """`[B, Q, M]`, `[B, M]` -> `[B, M]` query index per target, -1 for padding."""
  # Transposed, then replaced: in the other order XLA:CPU wrote two more [B, M, Q] copies
  # of the cost (B=64, 100 x 100, ~7 targets each: 1.9 against 0.9 ms for the match).
  cost = jnp.swapaxes(cost, 1, 2)
  return assignment.assign_rows(
      jnp.nan_to_num(cost, nan=_COST_LIMIT, posinf=_COST_LIMIT, neginf=-_COST_LIMIT), valid)


def _solve_on_host(cost: np.ndarray, valid: np.ndarray, target_for_query: np.ndarray,
                   query_for_target: np.ndarray) -> None:
  """Host side of 'scipy': fills the int32 outputs in place, one example at a time.

  Args:
    cost: `[..., Q, M]` float32, any values in padded columns, NaN/inf allowed.
    valid: `[..., M]` bool.
    target_for_query: `[..., Q]` int32 output, -1 where unmatched.
    query_for_target: `[..., M]` int32 output, -1 for padding.
  """
  num_queries, max_boxes = cost.shape[-2:]
  cost, valid = cost.reshape(-1, num_queries, max_boxes), valid.reshape(-1, max_boxes)
  # reshape of a C-contiguous array is a view, so these writes reach the outputs.
  target_for_query = target_for_query.reshape(-1, num_queries)
  query_for_target = query_for_target.reshape(-1, max_boxes)
  target_for_query.fill(-1)
  query_for_target.fill(-1)
  counts = valid.sum(-1)
  trailing = (valid == (np.arange(max_boxes) < counts[:, None])).all(-1)
  for b, count in enumerate(counts):
    if not count:
      continue
    # [targets, Q]: every row is matched, so the solver's row indices are 0..count-1.
    targets = np.arange(count) if trailing[b] else np.flatnonzero(valid[b])
    sub = cost[b, :, :count].T if trailing[b] else cost[b][:, targets].T
    try:
      _, queries = optimize.linear_sum_assignment(sub)
    except ValueError:  # NaN or -inf costs, or +inf everywhere in a row
      _, queries = optimize.linear_sum_assignment(
          np.nan_to_num(sub, nan=_COST_LIMIT, posinf=_COST_LIMIT, neginf=-_COST_LIMIT))
    query_for_target[b, targets] = queries
    target_for_query[b, queries] = targets


def _scipy(cost: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`[B, Q, M]`, `[B, M]` -> (`[B, Q]` target per query, `[B, M]` query per target)."""
  out_types = (jax.ShapeDtypeStruct(cost.shape[:2], jnp.int32),
               jax.ShapeDtypeStruct(valid.shape, jnp.int32))
  # 'broadcast_all': under jax.vmap the host still gets one call, with the mapped axis
  # leading; _solve_on_host flattens every leading axis.
  if jax.default_backend() == 'cpu':
    def fill(ctx, out, cost, valid):
      del ctx
      _solve_on_host(np.asarray(cost), np.asarray(valid), *map(np.asarray, out))
    return buffer_callback.buffer_callback(fill, out_types, vmap_method='broadcast_all')(
        cost, valid)

  def solve(cost, valid):
    cost, valid = np.asarray(cost), np.asarray(valid)
    out = (np.empty(cost.shape[:-1], np.int32), np.empty(valid.shape, np.int32))
    _solve_on_host(cost, valid, *out)
    return out
  return jax.pure_callback(solve, out_types, cost, valid, vmap_method='broadcast_all')


def detr_cost(class_logits: jax.Array, pred_boxes: jax.Array, labels: jax.Array,
              boxes: jax.Array, *, cost_class: float, cost_bbox: float,
              cost_giou: float) -> jax.Array:
  """DETR's matching cost `-w_c p[label] + w_b L1(cxcywh) - w_g GIoU(xyxy)`.

  Args:
    class_logits: `[B, Q, C+1]`, last class = no-object.
    pred_boxes: `[B, Q, 4]` cxcywh.
    labels: `[B, M]` int, target classes in [0, C).
    boxes: `[B, M, 4]` cxcywh targets.
    cost_class, cost_bbox, cost_giou: the weights (config.loss.det.cost_*).

  Returns:
    `[B, Q, M]` float32 cost.
  """
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  num_queries, max_boxes = probs.shape[1], labels.shape[1]
  # Padded targets may carry any label; clip so the gather stays in range.
  labels = jnp.clip(labels.astype(jnp.int32), 0, probs.shape[-1] - 1)
  labels = jnp.broadcast_to(labels[:, None, :], (labels.shape[0], num_queries, max_boxes))
  class_cost = -jnp.take_along_axis(probs, labels, axis=-1)
  pred_boxes, boxes = pred_boxes.astype(jnp.float32), boxes.astype(jnp.float32)
  l1 = jnp.abs(pred_boxes[:, :, None, :] - boxes[:, None, :, :]).sum(-1)
  giou = box_ops.pairwise_giou(box_ops.cxcywh_to_xyxy(pred_boxes),
                               box_ops.cxcywh_to_xyxy(boxes))
  return cost_class * class_cost + cost_bbox * l1 - cost_giou * giou


def total_cost(cost: jax.Array, query_for_target: jax.Array) -> jax.Array:
  """`[B]` summed cost of an assignment (`[B, M]` query per target, -1 skipped)."""
  picked = jnp.take_along_axis(cost, jnp.maximum(query_for_target, 0)[:, None, :], axis=1)
  return jnp.where(query_for_target >= 0, picked[:, 0, :], 0.0).sum(-1)

