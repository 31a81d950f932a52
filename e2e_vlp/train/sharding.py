"""Logical axis names and the rules that map them onto the device mesh.

The model names every parameter dimension and its main activations with the logical
names below; a sharding strategy is nothing but a rule table. Composing strategies
(`fsdp_tp`) is concatenating tables. The physical mesh axes are always
('data', 'fsdp', 'model'); a size-1 axis costs nothing.

Parameter axes:   embed, mlp, heads, kv, vocab, classes, queries, position,
                  conv_in, conv_out, conv_kernel, norm
Activation axes:  act_batch, act_length, act_embed, act_mlp, act_heads, act_kv, act_vocab
"""

from typing import Sequence

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension of every input is split over both

# Every logical name maps to None unless a strategy says otherwise: replicated.
_REPLICATED = (
    'embed', 'mlp', 'heads', 'kv', 'vocab', 'classes', 'queries', 'position',
    'conv_in', 'conv_out', 'conv_kernel', 'norm', 'act_length', 'act_embed',
    'act_mlp', 'act_heads', 'act_kv', 'act_vocab',
)

_DATA_PARALLEL = (('act_batch', BATCH_AXES),)
# ZeRO-3 style: parameters and optimizer state split on their largest common dimension.
_FSDP = (('embed', 'fsdp'), ('conv_out', 'fsdp'))
# Megatron style: attention heads and the MLP hidden dimension split over 'model'.
_TENSOR_PARALLEL = (
    ('mlp', 'model'), ('heads', 'model'), ('vocab', 'model'),
    ('act_mlp', 'model'), ('act_heads', 'model'), ('act_vocab', 'model'),
)

STRATEGIES = {
    'dp': _DATA_PARALLEL,
    'fsdp': _DATA_PARALLEL + _FSDP,
    'tp': _DATA_PARALLEL + _TENSOR_PARALLEL,
    'fsdp_tp': _DATA_PARALLEL + _FSDP + _TENSOR_PARALLEL,
}


def logical_axis_rules(strategy: str) -> Sequence[tuple[str, str | tuple[str, ...] | None]]:
  """Rules for `nn.logical_axis_rules` / `nn.logical_to_mesh_sharding`."""
  if strategy not in STRATEGIES:
    raise ValueError(
        f'config.sharding={strategy!r} is not a sharding strategy; '
        f'use one of {sorted(STRATEGIES)}.')
  rules = STRATEGIES[strategy]
  named = {name for name, _ in rules}
  return tuple(rules) + tuple((name, None) for name in _REPLICATED if name not in named)
