"""Benchmark: VQA accuracy after fine-tuning from different pre-trainings, in miniature.

The paper's ablation of the pre-training tasks on the embedded corpus with the `tiny`
model: VQA (configs/vqa.py) fine-tuned for the same number of steps
  * from scratch (no pre-training),
  * from pre-training with all losses (MLM, ITM, detection, captioning),
  * from pre-training without the detection loss (and its cell-class aid),
  * from pre-training without the captioning loss,
each pre-training run for the same number of steps. Prints one Markdown table of the
official VQA accuracy on the embedded VQA val split (overall and per answer type) with the
budget (steps, minutes). Runs go through `e2e_vlp.train.loop.run` and resume from their
workdirs, so an interrupted benchmark continues where it stopped.

A full run (defaults) takes roughly 30-40 minutes on a free 2-core CPU host:
  python bench/finetune_comparison.py
  python bench/finetune_comparison.py --pretrain_steps 20 --steps 20 --train_images 512
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from bench import common  # noqa: E402  (first: provides ml_collections where missing)

from absl import logging  # noqa: E402

from configs import pretrain  # noqa: E402
from configs import vqa  # noqa: E402
from e2e_vlp.train import loop  # noqa: E402

# name -> pre-training loss weights changed from configs/pretrain.py ('' = no pre-training).
VARIANTS = {
    'from scratch': None,
    'pre-trained (all losses)': {},
    'pre-trained w/o detection': {'detection': 0.0, 'cell_class': 0.0},
    'pre-trained w/o captioning': {'caption': 0.0},
}


def _data(config, args) -> None:
  """The same corpus (and so the same tokenizer) for every run."""
  d = config.data
  d.corpus_train_images, d.corpus_val_images = args.train_images, args.val_images
  config.cache_dir = args.cache_dir
  config.train.batch_size = args.batch_size


def _pretrain_config(weights: dict[str, float], args):
  config = pretrain.get_config('tiny')
  _data(config, args)
  config.loss.update(weights)
  t = config.train
  t.total_steps = args.pretrain_steps
  t.eval_every = t.checkpoint_every = t.log_every = args.pretrain_steps
  t.num_visualize = 0
  config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, args.pretrain_steps // 10))
  return config


def _vqa_config(init_from: str, args):
  config = vqa.get_config('tiny')
  _data(config, args)
  t = config.train
  t.total_steps = args.steps
  t.eval_every = t.checkpoint_every = t.log_every = args.steps
  config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, args.steps // 10))
  config.eval.batch_size = args.batch_size
  config.init_from = init_from
  return config


def _slug(name: str) -> str:
  return '_'.join(''.join(c if c.isalnum() else ' ' for c in name).split())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=400, help='VQA fine-tuning steps.')
  parser.add_argument('--pretrain_steps', type=int, default=1500)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--train_images', type=int, default=4000,
                      help='Embedded corpus train images (2 VQA questions each).')
  parser.add_argument('--val_images', type=int, default=250)
  parser.add_argument('--workdir', default='workdirs/bench_finetune_comparison')
  parser.add_argument('--cache_dir', default='', help="'' -> $E2E_VLP_CACHE or ~/.cache.")
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)

  print('\n'.join(common.machine_lines()))
  load = common.host_load()
  rows = []
  for name, weights in VARIANTS.items():
    start = time.time()
    init_from = ''
    if weights is not None:
      init_from = os.path.join(args.workdir, 'pretrain_' + _slug(name))
      loop.run(_pretrain_config(weights, args), init_from)
    pretrain_minutes = (time.time() - start) / 60
    start = time.time()
    result = loop.run(_vqa_config(init_from, args),
                      os.path.join(args.workdir, 'vqa_' + _slug(name)))
    vqa_minutes = (time.time() - start) / 60
    by_type = {k[len('eval/vqa_accuracy_'):]: v for k, v in result.items()
               if k.startswith('eval/vqa_accuracy_')}
    rows.append([name, args.pretrain_steps if weights is not None else 0, args.steps,
                 f'{result["eval/vqa_accuracy"]:.2f}',
                 ', '.join(f'{k} {v:.1f}' for k, v in sorted(by_type.items())),
                 f'{pretrain_minutes:.1f} + {vqa_minutes:.1f}'])
    print(f'{name}: VQA accuracy {result["eval/vqa_accuracy"]:.2f}', flush=True)

  print()
  print(f'VQA accuracy (official metric, %) on the embedded VQA val split '
        f'({args.val_images} images, 2 questions each), tiny model, batch {args.batch_size}; '
        f'corpus {args.train_images} train images. Minutes are pre-training + fine-tuning '
        '(a resumed run counts only what it ran).')
  print(common.markdown_table(
      ['pre-training', 'pre-train steps', 'VQA steps', 'VQA accuracy', 'per answer type',
       'minutes'], rows))
  print(common.load_note(load))


if __name__ == '__main__':
  main()
