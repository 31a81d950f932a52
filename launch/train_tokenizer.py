r"""Learns a WordPiece vocabulary (via sentencepiece) from a dataset's captions.

  python launch/train_tokenizer.py --captions_json ~/raw/coco/annotations/\
captions_train2014.json --vocab_size 8000 --out ~/tokenizers/coco8k

Writes OUT/vocab.txt (for e2e_vlp.data.tokenizer.Tokenizer; specials [PAD]=0 [UNK]=1
[CLS]=2 [SEP]=3 [MASK]=4 [BOS]=5 [EOS]=6) and OUT/spm.model. Accepts a COCO captions
JSON or a Karpathy JSON.
"""

import _bootstrap  # pylint: disable=unused-import,g-bad-import-order

from absl import app
from absl import flags
from absl import logging

from e2e_vlp.data import tokenizer

flags.DEFINE_string('captions_json', None, 'COCO captions or Karpathy JSON file.')
flags.DEFINE_integer('vocab_size', None, 'Exact size of the written vocabulary.')
flags.DEFINE_string('out', None, 'Output folder.')
flags.DEFINE_enum('model_type', 'bpe', ['unigram', 'bpe'], 'sentencepiece algorithm.')
flags.mark_flags_as_required(['captions_json', 'vocab_size', 'out'])


def main(argv):
  del argv
  f = flags.FLAGS
  captions = tokenizer.load_captions(f.captions_json)
  path = tokenizer.learn_vocab(captions, f.vocab_size, f.out, model_type=f.model_type)
  vocab = tokenizer.Tokenizer.from_vocab_file(path)
  logging.info('Learned %d tokens from %d captions: %s', vocab.vocab_size, len(captions), path)


if __name__ == '__main__':
  app.run(main)
