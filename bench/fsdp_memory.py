"""Benchmark: train-state bytes per device under each sharding strategy, peer 'dp'.

Builds the model's abstract train state (`jax.eval_shape`, nothing is allocated, so the
`base` model fits any host) and the shardings the loop would use on 8 virtual CPU
devices, then sums each device's slice of every parameter and Adam moment. Prints a
Markdown table: MiB per device, the ratio to 'dp' (fully replicated) and to an even
1/8 split. tests/test_scaleout.py checks the same accounting on materialised arrays.

Usage: python bench/fsdp_memory.py [--variant base|tiny] [--devices 8]
"""

import argparse
import collections
import os
import sys


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', default='base', choices=('tiny', 'base'))
  parser.add_argument('--devices', type=int, default=8)
  return parser.parse_args()


ARGS = _parse()
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={ARGS.devices}'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import pretrain  # noqa: E402
from e2e_vlp.models.e2e_vlp import E2EVLP  # noqa: E402
from e2e_vlp.models.e2e_vlp import init_inputs  # noqa: E402
from e2e_vlp.tasks.pretrain import batch_shapes  # noqa: E402
from e2e_vlp.train import mesh as mesh_lib  # noqa: E402
from e2e_vlp.train import sharding  # noqa: E402
from e2e_vlp.train import state as state_lib  # noqa: E402

MIB = 2 ** 20


def layouts(devices: int) -> list[tuple[str, tuple[int, int, int]]]:
  """(strategy, (data, fsdp, model)) rows; 'dp' first, the peer."""
  half = devices // 2
  return [('dp', (devices, 1, 1)), ('fsdp', (1, devices, 1)), ('tp', (half, 1, 2)),
          ('fsdp_tp', (1, half, 2))]


def bytes_per_device(abstract, shardings) -> dict[jax.Device, int]:
  """Each device's bytes of every leaf's slice (uneven splits counted exactly)."""
  held = collections.Counter()
  for leaf, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    itemsize = np.dtype(leaf.dtype).itemsize
    for device, index in s.devices_indices_map(leaf.shape).items():
      held[device] += itemsize * int(np.prod([len(range(*i.indices(n)))
                                              for i, n in zip(index, leaf.shape)]))
  return held


def measure(config, strategy: str, mesh_shape: tuple[int, int, int]) -> dict[str, float]:
  mesh = mesh_lib.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
  rules = sharding.logical_axis_rules(strategy)
  model = E2EVLP(config.model)
  spec = batch_shapes(config, 1)
  init = lambda rng: model.init({'params': rng, 'dropout': rng},
                                init_inputs(config.model, spec), train=False)
  _, _, abstract, shardings = state_lib.plan_train_state(init, config.optim, 10, mesh, rules)
  row = {}
  for part in ('params', 'opt_state'):
    held = bytes_per_device(getattr(abstract, part), getattr(shardings, part))
    row[part] = max(held.values()) / MIB
    row[f'{part}_total'] = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                               for x in jax.tree.leaves(getattr(abstract, part))) / MIB
  return row


def main():
  config = pretrain.get_config(ARGS.variant)
  config.data.image_size = 64  # the state does not depend on it; keeps eval_shape quick
  rows = [(name, shape, measure(config, name, shape)) for name, shape in layouts(ARGS.devices)]
  peer = rows[0][2]['params'] + rows[0][2]['opt_state']
  total = rows[0][2]['params_total'] + rows[0][2]['opt_state_total']
  print(f'{ARGS.variant} model, {ARGS.devices} devices: params {rows[0][2]["params_total"]:.1f} '
        f'MiB, Adam state {rows[0][2]["opt_state_total"]:.1f} MiB (largest device shown).\n')
  print('| strategy | mesh (data, fsdp, model) | params MiB | Adam MiB | vs dp | vs total/N |')
  print('|---|---|---:|---:|---:|---:|')
  for name, shape, row in rows:
    both = row['params'] + row['opt_state']
    print(f'| {name} | {shape} | {row["params"]:.2f} | {row["opt_state"]:.2f} | '
          f'{both / peer:.3f} | {both / (total / ARGS.devices):.3f} |')


if __name__ == '__main__':
  main()
