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


def make_optimizer(optim: ml_collections.ConfigDict, params: Any,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled decay scaled by lr, as torch.optim.AdamW), clipping, groups.

  Frozen parameters get zero gradients before clipping, so they neither move nor count in
  the global norm.
  """
  groups = parameter_groups(optim, params)
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.chain(
      optax.masked(optax.set_to_zero(), frozen_mask(optim, params)),
      optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity(),
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      optax.add_decayed_weights(optim.weight_decay, mask=groups['decay']),
      optax.scale_by_learning_rate(schedule),
      _scale_by_tree(groups['lr_mult']),
  )
  return tx, schedule
