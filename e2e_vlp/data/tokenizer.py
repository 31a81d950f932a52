"""BERT WordPiece tokenization in pure TensorFlow ops, and vocabulary learning.

One algorithm for every vocabulary: BERT's basic tokenizer (drop control characters,
strip accents, lower-case, split on whitespace and punctuation, isolate CJK characters)
followed by greedy longest-match-first WordPiece. It is written with core TensorFlow
ops only (tensorflow-text pins the full `tensorflow` package), so it runs inside a
tf.data graph, and it gives the same ids as `transformers.BertTokenizer` (the Rust
`tokenizers` BERT normaliser and pre-tokeniser) on the same `vocab.txt`.

The basic tokenizer is a per-character rewrite: every code point maps to itself, to
nothing, to a space, to itself between spaces, or to a short replacement string
(accents stripped, lower-cased). The rewrite is precomputed with `unicodedata` for all
of Unicode and stored as sorted code point intervals plus a small hash table. Checked
against the Rust tokenizer on every code point: they agree except on ~760 rare-script
characters whose Unicode category changed after the Rust crate's (older) tables.

Vocabularies come from a BERT `vocab.txt` or are learned with sentencepiece from a
dataset's captions and converted to WordPiece form (`learn_vocab`).
"""

import functools
import io
import json
import os
import tempfile
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tensorflow as tf

MAX_CHARS_PER_WORD = 100  # BERT: longer words become [UNK]
CONTINUATION = '##'
# Special tokens of a learned vocabulary, in id order.
LEARNED_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '[BOS]', '[EOS]')

# Per-character rewrite classes.
_KEEP, _DELETE, _SPACE, _ISOLATE, _MAP = range(5)
# BERT's "Chinese character" blocks (CJK Unified Ideographs and extensions).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True  # all non-alphanumeric ASCII, as BERT
  return unicodedata.category(ch).startswith('P')


def _rewrite(cp: int) -> str:
  """What BERT's basic tokenizer turns one code point into (spaces separate words)."""
  ch = chr(cp)
  cat = unicodedata.category(ch)
  if cat == 'Cn':
    return ch  # unassigned: kept, as the Rust tokenizer does
  if cp in (0, 0xFFFD) or (cat.startswith('C') and ch not in '\t\n\r'):
    return ''
  if ch in '\t\n\r ' or cat in ('Zs', 'Zl', 'Zp'):
    return ' '
  stripped = ''.join(c for c in unicodedata.normalize('NFD', ch)
                     if unicodedata.category(c) != 'Mn').lower()
  if any(lo <= cp <= hi for lo, hi in _CJK_RANGES):
    return f' {stripped} '
  return ''.join(f' {c} ' if _is_punctuation(c) else c for c in stripped)


@functools.lru_cache(maxsize=1)
def _rewrite_table() -> tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple[str, ...]]:
  """Interval starts [R] and classes [R] over all code points, plus the _MAP entries."""
  classes = np.empty(0x110000, np.int32)
  map_keys, map_values = [], []
  for cp in range(0x110000):
    out = _rewrite(cp)
    ch = chr(cp)
    if out == ch:
      classes[cp] = _KEEP
    elif out == '':
      classes[cp] = _DELETE
    elif out == ' ':
      classes[cp] = _SPACE
    elif out == f' {ch} ':
      classes[cp] = _ISOLATE
    else:
      classes[cp] = _MAP
      map_keys.append(cp)
      map_values.append(out)
  starts = np.flatnonzero(np.diff(classes, prepend=-1)).astype(np.int32)
  return starts, classes[starts], tuple(map_keys), tuple(map_values)


class BasicTokenizer:
  """BERT's basic tokenizer as TensorFlow ops: strings -> words."""

  def __init__(self):
    starts, classes, map_keys, map_values = _rewrite_table()
    self._starts = tf.constant(starts)
    self._classes = tf.constant(classes)
    self._map = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(map_keys, tf.int64), tf.constant(map_values, tf.string)), '')

  def words(self, texts: tf.Tensor) -> tf.RaggedTensor:
    """`texts` [N] tf.string -> words [N, (W)] tf.string (lower-cased, split)."""
    chars = tf.strings.unicode_split(texts, 'UTF-8', errors='replace')
    codes = tf.strings.unicode_decode(texts, 'UTF-8', errors='replace')
    cps = codes.flat_values
    cls = tf.gather(self._classes, tf.searchsorted(self._starts, cps, side='right') - 1)
    ch = chars.flat_values
    piece = tf.where(cls == _KEEP, ch, tf.where(
        cls == _DELETE, '', tf.where(
            cls == _SPACE, ' ', tf.where(
                cls == _ISOLATE, tf.strings.join([' ', ch, ' ']),
                self._map.lookup(tf.cast(cps, tf.int64))))))
    normalized = tf.strings.reduce_join(chars.with_flat_values(piece), axis=-1)
    return tf.strings.split(normalized)

  def normalize(self, texts: Sequence[str]) -> list[str]:
    """Python helper: each text's words joined by single spaces."""
    words = self.words(tf.constant(list(texts), tf.string))
    joined = tf.strings.reduce_join(words, axis=-1, separator=' ')
    return [t.decode('utf-8') for t in joined.numpy()]


class Tokenizer:
  """WordPiece tokenizer over a `vocab.txt` (one token per line, id = line number).

  `tokenize` is graph-mode TensorFlow (use it inside `tf.data.Dataset.map`);
  `detokenize` is Python, for decoded captions.
  """

  def __init__(self, vocab: Sequence[str]):
    self._vocab = list(vocab)
    index = {tok: i for i, tok in enumerate(self._vocab)}  # duplicates: last wins, as BERT
    missing = [t for t in ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]') if t not in index]
    if missing:
      raise ValueError(f'The vocabulary lacks the special tokens {missing}; a BERT vocab.txt '
                       'or one written by learn_vocab has them.')
    self._index = index
    self.pad_id, self.unk_id = index['[PAD]'], index['[UNK]']
    self.cls_id, self.sep_id, self.mask_id = index['[CLS]'], index['[SEP]'], index['[MASK]']
    for bos, eos in (('[BOS]', '[EOS]'), ('[unused0]', '[unused1]'), ('[CLS]', '[SEP]')):
      if bos in index and eos in index:
        self.bos_id, self.eos_id = index[bos], index[eos]
        break
    self._basic = BasicTokenizer()
    keys = list(index)
    self._table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, tf.string), tf.constant([index[k] for k in keys], tf.int64)), -1)
    lengths = [len(k[len(CONTINUATION):] if k.startswith(CONTINUATION) else k) for k in keys]
    self._max_piece_chars = max(1, min(max(lengths), MAX_CHARS_PER_WORD))

  @classmethod
  def from_vocab_file(cls, path: str | os.PathLike) -> 'Tokenizer':
    with open(path, encoding='utf-8') as f:
      return cls([line.rstrip('\n') for line in f])

  @property
  def vocab_size(self) -> int:
    return len(self._vocab)

  @property
  def special_ids(self) -> tuple[int, ...]:
    ids = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.bos_id,
           self.eos_id)
    return tuple(sorted(set(ids)))

  def id_to_token(self, i: int) -> str:
    return self._vocab[i]

  def token_to_id(self, token: str) -> int:
    return self._index.get(token, self.unk_id)

  def tokenize(self, strings: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
    """Token ids without [CLS]/[SEP].

    Args:
      strings: a scalar or [N] tf.string.

    Returns:
      [T] int32 for a scalar, [N, (T)] int32 RaggedTensor for a vector.
    """
    strings = tf.convert_to_tensor(strings, tf.string)
    if strings.shape.rank == 0:
      return self.tokenize(strings[None])[0]
    if strings.shape.rank != 1:
      raise ValueError(f'tokenize takes a scalar or a vector of strings, got shape '
                       f'{strings.shape}; flatten first (tf.reshape or RaggedTensor.flat_values).')
    words = self._basic.words(strings)
    return words.with_flat_values(self._wordpiece(words.flat_values)).merge_dims(1, 2)

  def _wordpiece(self, words: tf.Tensor) -> tf.RaggedTensor:
    """Greedy longest-match-first WordPiece on [W] words -> [W, (P)] int32 ids.

    All words advance together: each step looks up every candidate prefix of each
    unfinished word's remainder and takes the longest one in the vocabulary. A word
    with no match at some position, or longer than MAX_CHARS_PER_WORD, becomes [UNK].
    """
    num_words = tf.shape(words)[0]
    lengths = tf.strings.length(words, unit='UTF8_CHAR')
    too_long = lengths > MAX_CHARS_PER_WORD
    empty = tf.zeros([0], tf.int32)
    emitted_words = tf.TensorArray(tf.int32, size=1, dynamic_size=True, infer_shape=False,
                                   element_shape=[None]).write(0, empty)
    emitted_ids = tf.TensorArray(tf.int32, size=1, dynamic_size=True, infer_shape=False,
                                 element_shape=[None]).write(0, empty)

    def step(i, pos, active, failed, emitted_words, emitted_ids):
      idx = tf.cast(tf.where(active)[:, 0], tf.int32)  # [A] unfinished words
      start = tf.gather(pos, idx)
      num_cand = tf.minimum(tf.gather(lengths, idx) - start, self._max_piece_chars)
      seg = tf.repeat(tf.range(tf.size(idx)), num_cand)  # candidate -> active word
      first = tf.cumsum(num_cand, exclusive=True)
      cand_len = tf.range(tf.size(seg)) - tf.gather(first, seg) + 1
      cand_start = tf.gather(start, seg)
      sub = tf.strings.substr(tf.gather(words, tf.gather(idx, seg)), cand_start, cand_len,
                              unit='UTF8_CHAR')
      key = tf.where(cand_start > 0, tf.strings.join([CONTINUATION, sub]), sub)
      ids = tf.cast(self._table.lookup(key), tf.int32)
      best_len = tf.math.unsorted_segment_max(
          tf.where(ids >= 0, cand_len, 0), seg, tf.size(idx))
      ok = best_len > 0
      best_id = tf.gather(ids, first + tf.maximum(best_len, 1) - 1)
      emitted_words = emitted_words.write(i, tf.boolean_mask(idx, ok))
      emitted_ids = emitted_ids.write(i, tf.boolean_mask(best_id, ok))
      new_pos = start + best_len
      scatter = idx[:, None]
      pos = tf.tensor_scatter_nd_update(pos, scatter, new_pos)
      failed = tf.tensor_scatter_nd_update(failed, scatter, ~ok)
      active = tf.tensor_scatter_nd_update(active, scatter,
                                           ok & (new_pos < tf.gather(lengths, idx)))
      return i + 1, pos, active, failed, emitted_words, emitted_ids

    _, _, _, failed, emitted_words, emitted_ids = tf.while_loop(
        lambda i, pos, active, *_: tf.reduce_any(active), step,
        (tf.constant(1), tf.zeros_like(lengths), ~too_long, too_long, emitted_words,
         emitted_ids),
        maximum_iterations=MAX_CHARS_PER_WORD)
    word_of = emitted_words.concat()
    piece = emitted_ids.concat()
    keep = ~tf.gather(failed, word_of)
    unk_words = tf.cast(tf.where(failed)[:, 0], tf.int32)
    word_of = tf.concat([tf.boolean_mask(word_of, keep), unk_words], 0)
    piece = tf.concat([tf.boolean_mask(piece, keep),
                       tf.fill(tf.shape(unk_words), self.unk_id)], 0)
    order = tf.argsort(word_of, stable=True)  # emissions are step-major; make them word-major
    return tf.RaggedTensor.from_value_rowids(
        tf.gather(piece, order), tf.cast(tf.gather(word_of, order), tf.int64),
        nrows=tf.cast(num_words, tf.int64))

  def detokenize(self, ids) -> list[str]:
    """Token ids [B, T] (array, list of lists or RaggedTensor) -> B strings.

    Joins `##` continuations and drops special tokens; callers cut at [EOS] first
    when decoding.
    """
    if isinstance(ids, tf.RaggedTensor):
      ids = ids.to_list()
    elif isinstance(ids, tf.Tensor):
      ids = ids.numpy()
    specials = set(self.special_ids)
    out = []
    for row in ids:
      tokens = [self._vocab[int(i)] for i in row if int(i) not in specials]
      out.append(' '.join(tokens).replace(f' {CONTINUATION}', '').strip())
    return out


def load_captions(path: str | os.PathLike) -> list[str]:
  """Captions of a COCO captions JSON or a Karpathy JSON, in file order."""
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  if 'annotations' in data:
    return [a['caption'] for a in data['annotations'] if isinstance(a.get('caption'), str)]
  if 'images' in data and data['images'] and 'sentences' in data['images'][0]:
    return [s['raw'] for im in data['images'] for s in im['sentences']]
  raise ValueError(f'{path} is neither a COCO captions JSON (annotations[].caption) nor a '
                   'Karpathy JSON (images[].sentences[].raw).')


def _write_atomic(path: str, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-')
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def learn_vocab(captions: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
                model_type: str = 'bpe') -> str:
  """Learns a sentencepiece vocabulary on captions and writes it as WordPiece vocab.txt.

  BPE by default: on the embedded corpus' 44-word captions, sentencepiece's unigram model
  kept only ~60 pieces and split 'yellow' into y ##el ##l ##o ##w (25.6 tokens per
  caption, so 24-token texts lost their last objects and MLM learned spelling), while BPE
  keeps every word whole (11.0 tokens per caption).

  The captions go through the BERT basic tokenizer first, so sentencepiece sees the
  same words `Tokenizer` will split. Word-initial pieces `▁x` become `x`, the others
  `##x`; every character seen is added in both forms so no seen word maps to [UNK].
  The vocabulary is cut or padded with `[unusedK]` to exactly `vocab_size`, after the
  specials [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 [BOS]=5 [EOS]=6. The
  sentencepiece model is kept next to it as `spm.model` for reference.

  Returns:
    The path of vocab.txt.
  """
  if model_type not in ('unigram', 'bpe'):
    raise ValueError(f'model_type must be "unigram" or "bpe", got {model_type!r}.')
  lines = sorted(set(BasicTokenizer().normalize(list(captions))) - {''})
  if not lines:
    raise ValueError('learn_vocab got no non-empty captions.')
  chars = sorted({c for line in lines for c in line if c != ' '})
  fixed = list(LEARNED_SPECIALS) + chars + [CONTINUATION + c for c in chars]
  if len(fixed) > vocab_size:
    raise ValueError(f'vocab_size={vocab_size} is smaller than the {len(fixed)} special and '
                     'single-character tokens this corpus needs; raise it.')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type=model_type,
      vocab_size=max(vocab_size - len(LEARNED_SPECIALS), len(chars) + 2),
      hard_vocab_limit=False, character_coverage=1.0, normalization_rule_name='identity',
      split_by_whitespace=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1,
      input_sentence_size=0, minloglevel=2)
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  vocab, seen = list(fixed), set(fixed)
  for i in range(processor.get_piece_size()):
    if processor.is_unknown(i) or processor.is_control(i):
      continue
    piece = processor.id_to_piece(i)
    token = piece[1:] if piece.startswith('▁') else CONTINUATION + piece
    if token and token != CONTINUATION and token not in seen and len(vocab) < vocab_size:
      vocab.append(token)
      seen.add(token)
  vocab += [f'[unused{k}]' for k in range(vocab_size - len(vocab))]
  os.makedirs(out_dir, exist_ok=True)
  _write_atomic(os.path.join(out_dir, 'spm.model'), model.getvalue())
  path = os.path.join(out_dir, 'vocab.txt')
  _write_atomic(path, ''.join(t + '\n' for t in vocab).encode('utf-8'))
  return path


def default_tokenizer(cache_dir: str | os.PathLike, captions: Iterable[str],
                      vocab_size: int) -> Tokenizer:
  """The tokenizer learned on `captions`, cached as `cache_dir/vocab.txt`.

  `captions` is only iterated when no cached vocabulary exists.
  """
  path = os.path.join(cache_dir, 'vocab.txt')
  if not os.path.exists(path):
    learn_vocab(captions, vocab_size, cache_dir)
  tokenizer = Tokenizer.from_vocab_file(path)
  if tokenizer.vocab_size != vocab_size:
    raise ValueError(f'The cached vocabulary {path} has {tokenizer.vocab_size} tokens, the '
                     f'model expects {vocab_size}; delete it to learn a new one.')
  return tokenizer
