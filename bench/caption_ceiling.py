"""The best caption-token accuracy any model can reach on the embedded corpus.

Each image's captions come in several templates (`corpus._caption`); the template is the
only free choice, so even a model that sees the scene perfectly cannot predict the
tokens that reveal it. The best it can do at each position is the most likely next token
given the scene and the caption so far; this script estimates that Bayes-optimal
accuracy by sampling many captions per scene from the corpus' own caption generator
(`corpus.sample_caption`), tokenized into words as the learned BPE vocabulary does (every
caption word is one piece; tests/test_tokenizer.py checks it), with [EOS] counted like
the training and evaluation metrics count it.

Two estimates bracket the truth: `in-sample` picks and scores the most likely token on the
same samples (optimistic), `held-out` picks it on one half and scores the other half
(pessimistic). Compare `eval/caption_token_accuracy` with these, not with 1.0.

Usage: python bench/caption_ceiling.py [--scenes 100] [--samples 2000]
"""

import argparse
import collections
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

EOS = '[EOS]'
Caption = Sequence[str]


def prefix_counts(captions: Sequence[Caption]) -> dict[tuple[str, ...], collections.Counter]:
  """Next-token counts after every prefix of `captions` (each ends with [EOS])."""
  counts: dict[tuple[str, ...], collections.Counter] = collections.defaultdict(
      collections.Counter)
  for tokens in captions:
    for i, token in enumerate(tokens):
      counts[tuple(tokens[:i])][token] += 1
  return counts


def best_guess_hits(fit: Sequence[Caption], score: Sequence[Caption]) -> tuple[int, int]:
  """(tokens of `score` equal to the most frequent next token in `fit`, tokens scored).

  A prefix never seen in `fit` counts as a miss.
  """
  counts = prefix_counts(fit)
  best = {prefix: c.most_common(1)[0][0] for prefix, c in counts.items()}
  hits = sum(best.get(tuple(t[:i])) == token for t in score for i, token in enumerate(t))
  return hits, sum(len(t) for t in score)


def estimate(num_scenes: int, samples: int, max_tokens: int, image_size: int,
             seed: int) -> dict[str, float]:
  """In-sample and held-out token accuracy of the Bayes-optimal captioner."""
  from e2e_vlp.data import corpus  # noqa: PLC0415
  from e2e_vlp.data.tokenizer import BasicTokenizer  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  normalize = BasicTokenizer().normalize
  totals = collections.Counter()
  for _ in range(num_scenes):
    scene = corpus.make_scene(rng, image_size)[0]
    texts = normalize([corpus.sample_caption(scene, rng) for _ in range(samples)])
    caps = [t.split()[:max_tokens - 1] + [EOS] for t in texts]
    half = len(caps) // 2
    for name, (hits, n) in {'in-sample': best_guess_hits(caps, caps),
                            'held-out': best_guess_hits(caps[:half], caps[half:])}.items():
      totals[name + ' hits'] += hits
      totals[name + ' tokens'] += n
  return {name: totals[name + ' hits'] / totals[name + ' tokens']
          for name in ('in-sample', 'held-out')}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scenes', type=int, default=100)
  parser.add_argument('--samples', type=int, default=2000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  from configs import pretrain  # noqa: PLC0415
  data = pretrain.get_config('tiny').data
  result = estimate(args.scenes, args.samples, data.max_caption_len - 1,
                    data.corpus_image_size, args.seed)
  print(f'Bayes-optimal teacher-forced caption token accuracy on the embedded corpus '
        f'({args.scenes} scenes x {args.samples} sampled captions, word tokens + [EOS]):')
  for name, value in result.items():
    print(f'  {name:9s} {value:.4f}')


if __name__ == '__main__':
  main()
