"""NLVR2 fine-tuning: `get_config('tiny')` (embedded corpus) or `get_config('base')` (NLVR2).

Starts from the pre-training config of the same variant and changes the task, the data and
the optimizer. Values the paper does not state carry the source of their default.

  python launch/train.py --config configs/nlvr2.py --config.init_from workdirs/pretrain_tiny
  python launch/eval.py --config configs/nlvr2.py --workdir workdirs/nlvr2_tiny \
      --config.data.eval_split test
"""

import ml_collections

from configs import pretrain


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  config = pretrain.get_config(arg)
  tiny = config.variant == 'tiny'
  config.task = 'nlvr2'

  d = config.data
  d.dataset = 'embedded_nlvr2' if tiny else 'nlvr2'
  d.train_split = 'train'
  d.eval_split = 'val'  # NLVR2 dev; 'test' is test-P
  d.hflip_prob = 0.0  # required: statements name the "left" and "right" image
  d.crop_prob = 0.0  # a crop can cut away what the statement counts (assumed)

  o = config.optim
  o.lr = 3e-4 if tiny else 5e-5  # base: BERT-style fine-tuning rate (UNITER)
  o.warmup_steps = 50 if tiny else 500  # assumed (about 10% of the steps)
  o.schedule = 'linear'  # BERT fine-tuning
  o.end_lr_factor = 0.0
  o.frozen = ()  # fine-tuning updates the whole backbone (assumed)

  t = config.train
  t.batch_size = 32 if tiny else 128  # each example holds two images (assumed)
  t.total_steps = 600 if tiny else 8000  # base: about 12 epochs of NLVR2 train (assumed)
  t.eval_every = 200 if tiny else 1000
  t.checkpoint_every = t.eval_every
  t.num_visualize = 0

  e = config.eval = ml_collections.ConfigDict()
  e.batch_size = t.batch_size  # global; a multiple of the data-parallel size
  e.num_batches = 0  # 0: the whole eval split
  return config
