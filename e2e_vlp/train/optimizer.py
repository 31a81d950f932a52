"""AdamW with per-parameter learning-rate multipliers, frozen groups and no-decay rules.

Parameter groups are regexes over the '/'-joined parameter path (big_vision style), so a
config line such as `lr_mults = (('backbone/.*', 0.1),)` gives DETR's 0.1x backbone.
"""

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from e2e_vlp.materialize import materialized_on_cpu


def _paths(params: Any) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(params, sep=None)


def _tree_from_paths(params: Any, fn: Callable[[str], Any]) -> Any:
  """A tree shaped like `params` with fn('a/b/c') at each leaf."""
  flat = _paths(params)
  return traverse_util.unflatten_dict({k: fn('/'.join(k)) for k in flat})


def _first_match(path: str, rules: Sequence[tuple[str, Any]], default: Any) -> Any:
  for pattern, value in rules:
    if re.fullmatch(pattern, path):
      return value
  return default


def learning_rate_schedule(optim: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule:
  """Linear warm-up, then cosine / linear decay to `lr * end_lr_factor`, or constant."""
  warmup = min(int(optim.warmup_steps), total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = optim.lr * optim.end_lr_factor
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_factor)
  elif optim.schedule == 'linear':
    decay = optax.linear_schedule(optim.lr, end, decay_steps)
  elif optim.schedule == 'constant':
    decay = optax.constant_schedule(optim.lr)
  else:
    raise ValueError(f'config.optim.schedule={optim.schedule!r}: use cosine, linear or '
                     'constant.')
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay],
                              [warmup])


def parameter_groups(optim: ml_collections.ConfigDict, params: Any) -> dict[str, Any]:
  """Trees (shaped like params) of lr multipliers and weight-decay flags."""
  frozen = tuple((pattern, 0.0) for pattern in optim.frozen)
  mults = _tree_from_paths(
      params, lambda p: float(_first_match(p, frozen + tuple(optim.lr_mults), 1.0)))
  no_decay = tuple((pattern, False) for pattern in optim.no_decay)
  decay = _tree_from_paths(params, lambda p: _first_match(p, no_decay, True))
  return {'lr_mult': mults, 'decay': decay}


def frozen_mask(optim: ml_collections.ConfigDict, params: Any) -> Any:
  """Tree of bools shaped like `params`: True where the lr multiplier is 0 (`optim.frozen`
  or a 0 in `optim.lr_mults`). Pass it to `state.make_train_step(frozen=...)` so that
  their gradients are never computed."""
  return jax.tree.map(lambda m: m == 0.0, parameter_groups(optim, params)['lr_mult'])


def describe_groups(optim: ml_collections.ConfigDict, params: Any) -> str:
  """A human-readable summary of which parameters get which multiplier."""
  groups = parameter_groups(optim, params)
  flat = _paths(groups['lr_mult'])
  sizes = {k: int(v.size) for k, v in _paths(params).items()}
  by_mult: dict[float, int] = {}
  for key, mult in flat.items():
    by_mult[mult] = by_mult.get(mult, 0) + sizes[key]
  return ', '.join(f'{n:,} params at {m:g}x lr' for m, n in sorted(by_mult.items()))


def _scale_by_tree(mults: Any) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class GuardedTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation whose update takes `finite` (a bool scalar) and returns the old
  state where it is False: what `state.make_train_step` needs. Optax's own transformations
  accept extra arguments too but ignore them, hence a type of its own."""


def make_optimizer(optim: ml_collections.ConfigDict, params: Any, total_steps: int
                   ) -> tuple[GuardedTransformation, optax.Schedule]:
  """AdamW (decoupled decay scaled by lr, as torch.optim.AdamW), clipping, groups.

  Frozen parameters get zero gradients before clipping, so they neither move nor count in
  the global norm. `tx.update(grads, state, params, finite=f)` returns the state unchanged
  where the scalar `f` is False (the train step's non-finite guard; default True).
  `optim.fused_update` picks how the update is computed, not what: the optax chain below,
  or `_fused_adamw` (the same state, values to rounding).
  """
  groups = parameter_groups(optim, params)
  frozen = frozen_mask(optim, params)
  schedule = learning_rate_schedule(optim, total_steps)
  chain = optax.chain(
      optax.masked(optax.set_to_zero(), frozen),
      optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity(),
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      optax.add_decayed_weights(optim.weight_decay, mask=groups['decay']),
      optax.scale_by_learning_rate(schedule),
      _scale_by_tree(groups['lr_mult']),
  )
  if optim.fused_update:
    return _fused_adamw(chain, optim, groups, frozen, schedule), schedule
  return keep_state_unless_finite(chain), schedule


def where_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the scalar `finite` is True, else `old`, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def keep_state_unless_finite(tx: optax.GradientTransformation) -> GuardedTransformation:
  """`tx` whose update takes `finite` and returns the old state where it is False."""
  def update(updates, state, params=None, *, finite=True):
    updates, new_state = tx.update(updates, state, params)
    return updates, where_finite(finite, new_state, state)
  return GuardedTransformation(tx.init, update)


def _fused_adamw(chain: optax.GradientTransformation, optim: ml_collections.ConfigDict,
                 groups: dict[str, Any], frozen: Any, schedule: optax.Schedule
                 ) -> GuardedTransformation:
  """`keep_state_unless_finite(chain)` in the form XLA:CPU runs in fewer memory passes.

  The chain's state (its `init`, so checkpoints and shardings are the same) and formulas,
  in another form. The guard selects each new moment before anything reads it, and on the
  CPU backend the selected moments go through `materialized`, so that the parameters'
  fusion reads them instead of recomputing them from the old moments: XLA then updates
  parameters and moments in place, where the chain's form makes it copy both moments of
  every parameter first (tests/test_optimizer.py counts the copies). Multiplies where the
  chain divides: the clipped gradient is the gradient times clip / norm (as torch's
  clip_grad_norm_), which XLA recomputes in each moment's fusion instead of storing a
  clipped copy, and the bias corrections multiply by their inverses, since XLA's simplifier
  would merge a divide by them into `materialized`'s divide and undo it. Values differ from
  the chain's by rounding. The r50 DETR shape's update alone: 41 against 125 ms on 2 cores
  (a one-off probe); the step: README "Benchmarks".
  """
  b1, b2, eps, clip = optim.b1, optim.b2, optim.eps, optim.clip_norm

  def update(grads, state, params=None, *, finite=True):
    if params is None:
      raise ValueError('The fused AdamW update needs params (weight decay): pass them.')
    zeroed, clipped, adam, decayed, lr_state, scaled = state  # the chain's, in its order
    grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
    if clip:
      norm = optax.tree.norm(grads)
      factor = clip / norm
      grads = jax.tree.map(
          lambda g: jnp.where(norm < clip, g, g * factor.astype(g.dtype)), grads)
    guarded = lambda new, old: jax.tree.map(materialized_on_cpu, where_finite(finite, new, old))
    mu = guarded(optax.tree.update_moment(grads, adam.mu, b1, 1), adam.mu)
    nu = guarded(optax.tree.update_moment_per_elem_norm(grads, adam.nu, b2, 2), adam.nu)
    count = optax.safe_increment(adam.count)
    mu_scale, nu_scale = 1 / (1 - b1 ** count), 1 / (1 - b2 ** count)
    updates = jax.tree.map(
        lambda m, v: m * mu_scale.astype(m.dtype) / (jnp.sqrt(v * nu_scale.astype(v.dtype))
                                                     + eps), mu, nu)
    if optim.weight_decay:
      updates = jax.tree.map(lambda u, p, d: u + optim.weight_decay * p if d else u,
                             updates, params, groups['decay'])
    step_size = -1 * schedule(lr_state.count)
    updates = jax.tree.map(lambda u, m: jnp.asarray(step_size, u.dtype) * u
                           * jnp.asarray(m, u.dtype), updates, groups['lr_mult'])
    new_state = (zeroed, clipped,
                 adam._replace(count=jnp.where(finite, count, adam.count), mu=mu, nu=nu),
                 decayed,
                 lr_state._replace(count=jnp.where(finite, optax.safe_increment(lr_state.count),
                                                   lr_state.count)),
                 scaled)
    return updates, new_state

  return GuardedTransformation(chain.init, update)
