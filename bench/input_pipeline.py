"""Benchmark: examples/s of the pre-training input pipeline at 96 and 512 pixels.

Rows per resolution, all over the same in-memory JPEG records in the builders' format
(random smooth images, COCO-like 4:3 at 512, captions and boxes):
- `decode only`: tf.data reading and decoding the JPEGs, nothing else (the peer: an upper
  bound for any pipeline that decodes on this host);
- `pretrain eval`: deterministic resize, tokenization, masking, batching;
- `pretrain train`: the full training pipeline (flip, random resize, crop at 512, ITM, MLM).

Columns: examples/s after a warm-up, milliseconds per host batch, the size and time of
`get_state()` (the bytes stored beside each checkpoint), and the training step's own
consumption rate from `train_step_rate` (a hook for the train loop; '-' until wired).

Usage: python bench/input_pipeline.py [--quick] [--batches N]
"""

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # TensorFlow must not take GPU memory

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from configs import pretrain  # noqa: E402
from e2e_vlp.data import pipeline  # noqa: E402
from e2e_vlp.data import tokenizer as tokenizer_lib  # noqa: E402

WORDS = ('red', 'green', 'blue', 'small', 'large', 'circle', 'square', 'star', 'left', 'right',
         'of', 'above', 'below', 'a', 'the', 'two', 'three', 'near')


def train_step_rate(config: ml_collections.ConfigDict, batch_size: int) -> float | None:
  """Examples/s the training step consumes at this (full) config and host batch size.

  Compiles the real pre-training step (bench/pretrain_step.py: the train loop's mesh,
  optimizer and donated state) on a synthetic batch and times it after a warm-up step.
  """
  from bench import pretrain_step  # noqa: PLC0415
  return pretrain_step.examples_per_second(config, batch_size)


def settings(quick: bool) -> list[tuple[str, ml_collections.ConfigDict, int, tuple[int, int]]]:
  """(name, full config, host batch size, source image (height, width)) per resolution."""
  tiny = pretrain.get_config('tiny')
  # The base recipe scaled from DETR's 800 canvas to 512 (x0.64); crop as in DETR.
  large = pretrain.get_config('base')
  large.data.update(image_size=512, resize_sizes=tuple(range(320, 513, 32)), max_size=853)
  return [('tiny 96', tiny, tiny.train.batch_size, (96, 128)),
          ('512', large, 8 if quick else 16, (480, 640))]


def synthetic_examples(num: int, shape: tuple[int, int], seed: int = 0) -> list[dict[str, Any]]:
  """JPEG records in the builders' format: smooth random images, 5 captions, 1-5 boxes."""
  rng = np.random.default_rng(seed)
  h, w = shape
  examples = []
  for i in range(num):
    coarse = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    image = tf.image.resize(coarse[None], (h, w))[0].numpy() + rng.normal(0, 8, (h, w, 3))
    jpeg = tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90).numpy()
    m = int(rng.integers(1, 6))
    corners = np.sort(rng.uniform(0, 1, (m, 2, 2)), axis=1).reshape(m, 4)  # yxyx
    examples.append({
        'image/id': np.int64(i), 'image': jpeg,
        'captions': [' '.join(rng.choice(WORDS, 10)) for _ in range(5)],
        'objects': {'bbox': corners.astype(np.float32),
                    'label': rng.integers(1, 7, m).astype(np.int64),
                    'attributes': rng.integers(0, 8, (m, 2)).astype(np.int64)},
    })
  return examples


def decode_only(source: tf.data.Dataset, batch_size: int) -> Callable[[], Any]:
  """The peer: repeat, decode, batch the decoded sizes (ragged images cannot be batched)."""
  dataset = source.repeat().map(
      lambda ex: tf.shape(tf.io.decode_jpeg(ex['image'], channels=3)),
      num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)
  iterator = iter(dataset)
  return lambda: next(iterator)


def rate(next_batch: Callable[[], Any], batch_size: int, warmup: int, batches: int
         ) -> tuple[float, float]:
  """(examples/s, ms per batch) over `batches` batches after `warmup` batches."""
  for _ in range(warmup):
    next_batch()
  start = time.perf_counter()
  for _ in range(batches):
    next_batch()
  seconds = time.perf_counter() - start
  return batches * batch_size / seconds, 1000 * seconds / batches


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='fewer records and batches')
  parser.add_argument('--batches', type=int, default=None, help='timed batches per row')
  args = parser.parse_args()
  batches = args.batches or (5 if args.quick else 20)
  warmup = 2 if args.quick else 5

  with tempfile.TemporaryDirectory() as vocab_dir:
    tokenizer = tokenizer_lib.Tokenizer.from_vocab_file(tokenizer_lib.learn_vocab(
        [' '.join(WORDS)] * 4, 512, vocab_dir))
    print_table(tokenizer, args.quick, batches, warmup)


def print_table(tokenizer: tokenizer_lib.Tokenizer, quick: bool, batches: int,
                warmup: int) -> None:
  """One row per resolution and pipeline: throughput, iterator state size and save time."""
  print(f'host: {os.cpu_count()} CPUs; TensorFlow {tf.__version__}; {batches} timed '
        f'batches after {warmup} warm-up\n')
  print('| resolution | pipeline | host batch | examples/s | ms/batch | state MB | '
        'state save ms | train step examples/s |')
  print('|---|---|---|---|---|---|---|---|')
  for name, config, batch_size, shape in settings(quick):
    examples = synthetic_examples(64 if quick else 256, shape)
    source = pipeline.from_examples(examples)
    step_rate = train_step_rate(config, batch_size)
    step_cell = f'{step_rate:.1f}' if step_rate is not None else '-'
    throughput, ms = rate(decode_only(source, batch_size), batch_size, warmup, batches)
    print(f'| {name} | decode only | {batch_size} | {throughput:.1f} | {ms:.1f} | - | - | '
          f'{step_cell} |')
    # Eval makes one pass: repeat the records enough times for the timed batches.
    passes = -(-(warmup + batches + 1) * batch_size // len(examples))
    for train in (False, True):
      iterator = pipeline.make_pretrain_dataset(
          config.data, tokenizer, split='train', train=train, global_batch_size=batch_size,
          process_index=0, process_count=1, source=source if train else source.repeat(passes))
      throughput, ms = rate(lambda: next(iterator), batch_size, warmup, batches)
      start = time.perf_counter()
      state = iterator.get_state()
      save_ms = 1000 * (time.perf_counter() - start)
      print(f'| {name} | pretrain {"train" if train else "eval"} | {batch_size} | '
            f'{throughput:.1f} | {ms:.1f} | {len(state) / 2**20:.1f} | {save_ms:.0f} | '
            f'{step_cell} |')
  mean_bytes = np.mean([len(ex['image']) for ex in examples])
  print(f'\nState = shuffle buffer (config.data.shuffle_buffer records of ~{mean_bytes / 1e3:.0f}'
        ' kB at 512 here; all records when fewer) + prefetched batches.')


if __name__ == '__main__':
  main()
