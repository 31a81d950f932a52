"""Benchmark: caption decoding (e2e_vlp/decoding.py), KV-cached vs uncached, tokens/s.

Peers on the same images and weights, each one jitted loop from the image to the tokens:
- greedy without cache (`greedy_decode_uncached`: every step reruns the caption decoder
  over the whole prefix), the reference;
- greedy with the KV cache (`greedy_decode`); its tokens must equal the reference's;
- beam search (`beam_search`, k beams, GNMT alpha 0.6) without the cache
  (`cached=False`: each step reruns the decoder over every beam's prefix) and with it; the
  cached tokens must equal the uncached ones.

Random weights would stop at a random [EOS]; the [EOS] logit's bias is set to -1e9 so every
caption runs the full `max_len` and all peers do the same number of steps. Tokens/s counts
output tokens (batch x max_len) per second, encoder pass included.

Usage: python bench/decoding.py [--quick] [--repeats N] [--variants tiny,base]
"""

import argparse
import dataclasses
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402  (first: provides ml_collections where missing)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import pretrain_step  # noqa: E402
from configs import pretrain  # noqa: E402
from e2e_vlp import decoding  # noqa: E402
from e2e_vlp.models.e2e_vlp import E2EVLP  # noqa: E402
from e2e_vlp.models.e2e_vlp import init_inputs  # noqa: E402

BOS_ID, EOS_ID, PAD_ID = 2, 3, 0  # the project's WordPiece layout ([PAD]=0); any ids work


@dataclasses.dataclass(frozen=True)
class Setting:
  variant: str
  image_size: int
  batch_size: int
  max_len: int
  beam_size: int = 4


# base on a smaller canvas than training: decoding cost is in the decoder, not the image.
SETTINGS = {'tiny': Setting('tiny', 96, 8, 24), 'base': Setting('base', 256, 4, 20)}


def model_and_variables(setting: Setting, seed: int = 0) -> tuple[E2EVLP, Any, dict]:
  """The model, random variables with [EOS] unreachable, and a batch of images."""
  config = pretrain.get_config(setting.variant)
  config.data.image_size = setting.image_size
  shapes, _ = pretrain_step.task_pieces()
  model = E2EVLP(config.model)
  inputs = init_inputs(config.model, shapes(config, 1))
  variables = nn.meta.unbox(jax.jit(lambda rng: model.init(rng, inputs, train=False))(
      jax.random.key(seed)))
  bias = variables['params']['caption_head']['bias']
  variables['params']['caption_head']['bias'] = bias.at[EOS_ID].set(-1e9)
  batch = pretrain_step.synthetic_batch(config, setting.batch_size, shapes, seed)
  return model, variables, {'image': batch['image'], 'image_mask': batch['image_mask']}


def run(quick: bool = False, repeats: int | None = None,
        variants: tuple[str, ...] | None = None) -> str:
  """Markdown section: ms per batch and tokens/s of each decoder; each search with the KV
  cache against the same search without it."""
  reps = repeats or (3 if quick else 10)
  load = common.host_load()
  rows = []
  for name in variants or (('tiny',) if quick else ('tiny', 'base')):
    setting = SETTINGS[name]
    model, variables, images = model_and_variables(setting)
    ids = dict(bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, max_len=setting.max_len)
    args = (model, variables, images['image'], images['image_mask'])
    beam = f'beam {setting.beam_size}'
    search = dict(beam_size=setting.beam_size, length_penalty=0.6)
    fns = {
        'greedy, no cache': lambda: decoding.greedy_decode_uncached(*args, **ids),
        'greedy, KV cache': lambda: decoding.greedy_decode(*args, **ids),
        f'{beam}, no cache': lambda: decoding.beam_search(*args, **ids, **search,
                                                          cached=False)[0],
        f'{beam}, KV cache': lambda: decoding.beam_search(*args, **ids, **search)[0],
    }
    for search_name in ('greedy', beam):
      reference = np.asarray(fns[f'{search_name}, no cache']())
      cached = np.asarray(fns[f'{search_name}, KV cache']())
      if not np.array_equal(reference, cached):
        raise AssertionError(f'{name}: cached {search_name} tokens differ from uncached ones '
                             f'at {int((reference != cached).sum())} positions.')
    ms = common.time_interleaved(fns, warmup=1, repeats=reps)
    tokens = setting.batch_size * setting.max_len
    for peer, value in ms.items():
      uncached_ms = ms[peer.split(',')[0] + ', no cache']
      rows.append((name, f'{setting.image_size}px x {setting.batch_size}, {setting.max_len} '
                   'tokens', peer, f'{value:.0f}', f'{tokens / value * 1e3:.0f}',
                   f'{uncached_ms / value:.2f}x'))
  return '\n'.join([
      '## Caption decoding: KV cache vs none, greedy and beam search', '',
      common.load_note(load), '',
      common.markdown_table(('model', 'images, length', 'decoder', 'ms/batch', 'tokens/s',
                             'speed-up vs the same search, no cache'), rows), '',
      'Cached tokens equal the uncached ones, greedy and beam (checked). Every caption runs '
      'the full length ([EOS] made unreachable); the image encoder pass is inside each '
      'timing.'])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='fewer repeats')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--variants', default='', help='tiny,base (default: tiny if --quick)')
  args = parser.parse_args()
  print(run(args.quick, args.repeats, tuple(args.variants.split(',')) if args.variants else None))


if __name__ == '__main__':
  main()
