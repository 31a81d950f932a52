"""VQA v2 fine-tuning: `get_config('tiny')` (embedded corpus) or `get_config('base')` (VQA v2).

Starts from the pre-training config of the same variant (same model, tokenizer and data
knobs) and changes the task, the data, the optimizer and the answer head. Values the paper
does not state carry the source of their default.

  python launch/train.py --config configs/vqa.py --config.init_from workdirs/pretrain_tiny
  python launch/eval.py --config configs/vqa.py --workdir workdirs/vqa_tiny
  python launch/train.py --config configs/vqa.py:base --config.data.data_dir ~/tfds \
      --config.data.tokenizer ~/bert/vocab.txt --config.init_from /ckpt/pretrain_base
"""

import ml_collections

from configs import pretrain


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  config = pretrain.get_config(arg)
  tiny = config.variant == 'tiny'
  config.task = 'vqa'

  d = config.data
  d.dataset = 'embedded_vqa' if tiny else 'vqa_v2'
  d.train_split = 'train'
  d.eval_split = 'val'  # 'test_dev' / 'test' have no answers: submission file only
  d.hflip_prob = 0.0  # answers such as 'left' would contradict flipped pixels (UNITER)
  d.crop_prob = 0.0  # a crop can cut away what the question asks about (assumed)

  # Answer vocabulary: at least the dataset's (`builders.load_answer_vocab`); tiny: the
  # embedded corpus has about 17 answers (assumed margin); base: the 3,129 answers of the
  # bottom-up-attention setup the paper follows.
  config.model.num_answers = 32 if tiny else 3129

  o = config.optim
  o.lr = 3e-4 if tiny else 5e-5  # base: BERT-style fine-tuning rate (UNITER)
  o.warmup_steps = 50 if tiny else 1000  # assumed (about 10% of the steps, UNITER)
  o.schedule = 'linear'  # BERT fine-tuning
  o.end_lr_factor = 0.0
  o.frozen = ()  # fine-tuning updates the whole backbone (assumed)

  t = config.train
  t.batch_size = 32 if tiny else 256  # assumed
  t.total_steps = 600 if tiny else 20000  # base: about 20 epochs of VQA v2 train (assumed)
  t.eval_every = 200 if tiny else 2000
  t.checkpoint_every = t.eval_every
  t.num_visualize = 0  # no drawing; VQA writes its submission file instead

  e = config.eval = ml_collections.ConfigDict()
  e.batch_size = t.batch_size  # global; a multiple of the data-parallel size
  e.num_batches = 0  # 0: the whole eval split (the official accuracy needs every question)
  return config
