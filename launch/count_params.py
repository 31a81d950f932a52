r"""Prints a config's parameter counts per top-level module, from jax.eval_shape (no memory).

  python launch/count_params.py --config configs/pretrain.py:base
"""

import _bootstrap  # pylint: disable=g-bad-import-order

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.tasks.pretrain import batch_shapes
from e2e_vlp.train.state import strip_boxes

_bootstrap.define_config_flag(os.path.join(_bootstrap.ROOT, 'configs', 'pretrain.py'),
                              'Model config.', lock_config=False)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def main(argv):
  del argv
  config = flags.FLAGS.config
  model = E2EVLP(config.model)
  batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_shapes(config, 1).items()}
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(0)}
  variables = strip_boxes(jax.eval_shape(lambda: model.init(rngs, batch, train=False)))
  for collection, tree in variables.items():
    print(f'{collection}: {count(tree):,}')
    for name, sub in tree.items():
      print(f'  {name:24s} {count(sub):>14,}')


if __name__ == '__main__':
  app.run(main)
