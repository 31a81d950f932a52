"""Benchmark: checkpoint save time of a train state, orbax's replica-parallel default
against this project's floor (`config.train.checkpoint_replica_parallel_min_bytes`).

A replica-parallel save slices every replicated array once per device, and each new
(shape, device) pair compiles a program, so the first save of a run pays for hundreds of
compiles and later ones for hundreds of small writes. Each side runs in a fresh process
(compile caches are per process) on 8 host devices with the data-parallel mesh of the
training loop, saving the same freshly initialised TrainState (params + AdamW moments).

Usage: python bench/checkpoint_save.py [--config tiny] [--rounds 2] [--saves 3]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SIDES = {'orbax default (always replica-parallel)': 0, 'ours (1 MiB floor)': 1 << 20}


def worker(config_name: str, min_bytes: int, saves: int) -> dict:
  """Times `saves` saves and one restore of the `config_name` state; a fresh process."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415

  from configs import pretrain  # noqa: PLC0415
  from e2e_vlp.models.e2e_vlp import E2EVLP  # noqa: PLC0415
  from e2e_vlp.models.e2e_vlp import init_inputs  # noqa: PLC0415
  from e2e_vlp.tasks.pretrain import batch_shapes  # noqa: PLC0415
  from e2e_vlp.train import checkpoint as ckpt_lib  # noqa: PLC0415
  from e2e_vlp.train import mesh as mesh_lib  # noqa: PLC0415
  from e2e_vlp.train import sharding  # noqa: PLC0415
  from e2e_vlp.train import state as state_lib  # noqa: PLC0415

  config = pretrain.get_config(config_name)
  model = E2EVLP(config.model)
  init = lambda rng: model.init({'params': rng, 'dropout': rng},
                                init_inputs(config.model, batch_shapes(config, 1)), train=False)
  mesh = mesh_lib.make_mesh({'data': -1, 'fsdp': 1, 'model': 1})
  rules = sharding.logical_axis_rules(config.sharding)
  tx, _, abstract, shardings = state_lib.plan_train_state(init, config.optim, 10, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.block_until_ready(state_lib.create_train_state(init, tx, jax.random.key(1),
                                                               shardings))
  leaves = jax.tree.leaves(state)
  with tempfile.TemporaryDirectory() as workdir:
    ckpt = ckpt_lib.Checkpointer(workdir, keep=saves, replica_parallel_min_bytes=min_bytes)
    save_s = []
    for step in range(saves):
      start = time.perf_counter()
      ckpt.save(step, state, force=True)
      ckpt.wait()
      save_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(ckpt.restore(saves - 1, ckpt_lib.abstract_with_shardings(
        abstract, shardings), with_data=False)[0])
    restore_s = time.perf_counter() - start
    ckpt.close()
  return {'arrays': len(leaves), 'mib': sum(x.nbytes for x in leaves) / 2**20,
          'devices': jax.device_count(), 'save_s': save_s, 'restore_s': restore_s}


def run_side(config_name: str, min_bytes: int, saves: int) -> dict:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run(
      [sys.executable, __file__, '--worker', str(min_bytes), '--config', config_name,
       '--saves', str(saves)], env=env, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='tiny', help='pre-training config: tiny or base')
  parser.add_argument('--rounds', type=int, default=2, help='fresh processes per side')
  parser.add_argument('--saves', type=int, default=3, help='saves per process (>= 2)')
  parser.add_argument('--worker', type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker is not None:
    print(json.dumps(worker(args.config, args.worker, args.saves)))
    return

  import numpy as np  # noqa: PLC0415

  from bench import common  # noqa: PLC0415
  load = common.host_load()
  results = {name: [] for name in SIDES}
  for _ in range(args.rounds):  # alternate sides, so host drift hits both
    for name, min_bytes in SIDES.items():
      results[name].append(run_side(args.config, min_bytes, args.saves))
  first = {n: float(np.median([r['save_s'][0] for r in rs])) for n, rs in results.items()}
  later = {n: float(np.median([s for r in rs for s in r['save_s'][1:]]))
           for n, rs in results.items()}
  restore = {n: float(np.median([r['restore_s'] for r in rs])) for n, rs in results.items()}
  peer = next(iter(SIDES))
  rows = [(name, f'{first[name]:.2f} ({first[name] / first[peer]:.2f}x)',
           f'{later[name]:.2f} ({later[name] / later[peer]:.2f}x)',
           f'{restore[name]:.2f}') for name in SIDES]
  sample = results[peer][0]
  print('\n'.join([
      f'## Checkpoint save, `{args.config}` TrainState ({sample["arrays"]} arrays, '
      f'{sample["mib"]:.1f} MiB) replicated over {sample["devices"]} host devices', '',
      common.load_note(load), '',
      common.markdown_table(('orbax array handler', 'first save s (vs default)',
                             'later saves s (vs default)', 'restore s'), rows), '',
      f'Medians over {args.rounds} fresh processes per side (interleaved), '
      f'{args.saves} saves each; a save is timed until it is on disk.']))


if __name__ == '__main__':
  main()
