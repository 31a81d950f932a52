"""Pre-training learning rate x seed (6 runs), for configs/pretrain.py.

  python launch/sweep.py --config configs/pretrain.py:tiny \
      --sweep configs/sweeps/pretrain_lr.py --workdir workdirs/pretrain_lr
"""

from e2e_vlp.sweep import axis, product


def get_sweep() -> list[dict]:
  # Around the tiny default (1e-3); DETR's 1e-4 is the base model's.
  return product(axis('optim.lr', [3e-4, 1e-3, 3e-3]), axis('train.seed', [0, 1]))
