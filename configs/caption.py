"""Image captioning fine-tuning (Karpathy protocol): `get_config('tiny'|'base')`.

Teacher-forced caption decoder with optional label smoothing; evaluation decodes with greedy
or beam search and scores BLEU-4, METEOR, ROUGE-L and CIDEr (SPICE reported as unavailable).
Values the paper does not state carry the source of their default.

  python launch/train.py --config configs/caption.py --config.init_from workdirs/pretrain_tiny
  python launch/eval.py --config configs/caption.py --workdir workdirs/caption_tiny \
      --config.data.eval_split test --config.eval.beam_size 5
"""

import ml_collections

from configs import pretrain


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  config = pretrain.get_config(arg)
  tiny = config.variant == 'tiny'
  config.task = 'caption'

  d = config.data
  # Karpathy splits (train / val / test) of the embedded corpus (tiny) or of COCO 2014
  # (base: dataset_coco.json, 113,287 / 5,000 / 5,000 images, restval in train).
  d.dataset = 'embedded_retrieval' if tiny else 'coco_karpathy'
  d.train_split = 'train'
  d.eval_split = 'val'  # report 'test', scored against all references of each image
  d.crop_prob = 0.0  # a crop can cut away what the caption names (assumed)

  config.loss.label_smoothing = 0.1  # assumed (common in caption fine-tuning)

  o = config.optim
  o.lr = 3e-4 if tiny else 5e-5  # base: BERT-style fine-tuning rate (assumed)
  o.warmup_steps = 50 if tiny else 1000  # assumed
  o.schedule = 'linear'
  o.end_lr_factor = 0.0
  o.frozen = ()

  t = config.train
  t.batch_size = 32 if tiny else 256  # assumed
  t.total_steps = 600 if tiny else 20000  # assumed
  t.eval_every = 200 if tiny else 2000
  t.checkpoint_every = t.eval_every
  t.num_visualize = 0

  e = config.eval = ml_collections.ConfigDict()
  e.batch_size = t.batch_size  # images per decoding batch (global)
  e.num_batches = 0  # 0: the whole eval split
  e.decode = 'beam'  # 'beam' | 'greedy'
  e.beam_size = 3 if tiny else 5  # assumed (OSCAR / VinVL decode with 5 beams)
  e.length_penalty = 0.6  # GNMT alpha (Wu et al., 2016); 0 ranks by raw log-probability
  e.max_len = 20  # tokens generated after [BOS] (the usual COCO limit)
  e.meteor = True  # METEOR starts a Java process (~5-10 s)
  return config
