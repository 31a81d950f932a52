r"""One process of the multi-process training test (launched by tests/test_multihost.py).

  # process i of 2, each with 2 CPU devices, one shared workdir:
  python tests/multihost_worker.py --cache C --workdir W --local_devices 2 \
      --coordinator 127.0.0.1:PORT --num_processes 2 --process_id i
  # the single-process reference on 4 devices, fed what 2 hosts would read:
  python tests/multihost_worker.py --cache C --workdir R --local_devices 4 --emulate_hosts 2

Both train the micro model through the real loop (`loop.run`). In `--emulate_hosts N` mode
each global batch is replaced by the concatenation of the N host-local batches the pipeline
yields for `process_index=0..N-1, process_count=N`, so that both runs see the same global
batches if, and only if, the real hosts each read their own share of the data.
Writes `<workdir>/result_<process>.json`: the image ids trained on, per step, and the
loop's final metrics.
"""

import argparse
import json
import os
import sys

import numpy as np

# Shrinks the micro config further: 2 steps, one evaluation at the end, and a global batch
# of 12 so that the 16 validation images split 8 per host -> 2 host batches of 6, the
# second padded (the hosts must still run the same number of eval steps).
OVERRIDES = {
    'train.batch_size': 12,
    'train.total_steps': 2,
    'train.log_every': 1,
    'train.checkpoint_every': 2,
    'train.eval_every': 2,
    'train.eval_batches': 2,
    'train.num_visualize': 0,
    'data.prefetch': 1,
}


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cache', required=True, help='micro corpus cache (micro_cache).')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--local_devices', type=int, required=True)
  parser.add_argument('--coordinator', default='', help='host:port of process 0.')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--emulate_hosts', type=int, default=0,
                      help='single process: train on the batches of this many hosts.')
  return parser.parse_args(argv)


def _concatenate_hosts(iterators) -> dict[str, np.ndarray]:
  """Host batches in process order, as `make_array_from_process_local_data` lays them out."""
  batches = [next(it) for it in iterators]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]
          if np.ndim(batches[0][k])}


def main(argv: list[str]) -> None:
  args = _parse(argv)
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  sys.path[:0] = [os.path.dirname(tests_dir), tests_dir]
  import fast_compile  # pylint: disable=g-import-not-at-top
  # Must precede the first jax import. The cheapest code generation: compiling dominates
  # these short runs (every process compiles with the same flags, so results compare).
  os.environ['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={args.local_devices} '
                             f'{fast_compile.FLAGS}')
  os.environ['JAX_PLATFORMS'] = 'cpu'

  import jax  # pylint: disable=g-import-not-at-top
  from e2e_vlp import tasks  # pylint: disable=g-import-not-at-top
  from e2e_vlp.data import pipeline  # pylint: disable=g-import-not-at-top
  from e2e_vlp.train import distributed  # pylint: disable=g-import-not-at-top
  from e2e_vlp.train import loop  # pylint: disable=g-import-not-at-top
  from micro import micro_config  # pylint: disable=g-import-not-at-top

  multi = distributed.initialize_from_environment(args.coordinator or None,
                                                  args.num_processes, args.process_id)
  config = micro_config(args.cache, **OVERRIDES)
  image_ids: list[list[int]] = []
  hosts = []
  if args.emulate_hosts:
    task = tasks.get_task(config)
    hosts = [pipeline.make_pretrain_dataset(
        config.data, task.tokenizer, data_dir=task.data.data_dir,
        split=config.data.train_split, train=True, global_batch_size=config.train.batch_size,
        seed=config.train.seed, process_index=p, process_count=args.emulate_hosts)
             for p in range(args.emulate_hosts)]

  def hook(step: int, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    del step
    if hosts:
      local = _concatenate_hosts(hosts)
    image_ids.append([int(i) for i in local['image_id']])
    return local

  last = loop.run(config, args.workdir, batch_hook=hook)
  result = {'process_index': jax.process_index(), 'process_count': jax.process_count(),
            'device_count': jax.device_count(), 'image_ids': image_ids,
            'last': {k: v for k, v in last.items() if isinstance(v, (int, float))}}
  with open(os.path.join(args.workdir, f'result_{jax.process_index()}.json'), 'w') as f:
    json.dump(result, f)
  if multi:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1:])
