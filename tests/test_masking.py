"""BERT masking: 15% selection, 80/10/10 actions, never on special or padding tokens."""

import numpy as np
import tensorflow as tf

from e2e_vlp.data import masking

PAD, CLS, SEP, MASK, VOCAB = 0, 1, 2, 3, 1000
SPECIAL = (PAD, CLS, SEP, MASK)


def _batch(n=2000, length=32, seed=0):
  """[CLS] tokens [SEP] [PAD]... with random lengths, as numpy."""
  rng = np.random.default_rng(seed)
  ids = np.full((n, length), PAD, np.int32)
  for row, size in zip(ids, rng.integers(1, length - 1, n)):
    row[0], row[1:size + 1], row[size + 1] = CLS, rng.integers(4, VOCAB, size), SEP
  return ids


def _mask(ids, seed=(0, 1), prob=0.15):
  out, labels = masking.mask_tokens(ids, tf.constant(seed), mlm_prob=prob, mask_id=MASK,
                                    vocab_size=VOCAB, special_ids=SPECIAL)
  return out.numpy(), labels.numpy()


def test_rates_match_bert():
  ids = _batch()
  out, labels = _mask(ids)
  maskable = ids >= 4
  selected = labels >= 0
  n = selected.sum()
  assert abs(n / maskable.sum() - 0.15) < 0.006  # ~48k maskable tokens: 4.5 sigma
  became_mask = (out == MASK) & selected
  unchanged = (out == ids) & selected
  random = selected & ~became_mask & ~unchanged
  assert abs(became_mask.sum() / n - 0.8) < 0.015
  assert abs(random.sum() / n - 0.1) < 0.012
  assert abs(unchanged.sum() / n - 0.1) < 0.012
  assert np.all(out[random] >= 4)  # replacements are never special tokens


def test_never_touches_special_or_padding_and_labels_are_originals():
  ids = _batch(n=300)
  out, labels = _mask(ids, prob=0.9)
  special = ~(ids >= 4)
  assert np.all(labels[special] == -1)
  np.testing.assert_array_equal(out[special], ids[special])
  np.testing.assert_array_equal(labels[labels >= 0], ids[labels >= 0])
  np.testing.assert_array_equal(out[labels < 0], ids[labels < 0])


def test_seeded():
  ids = _batch(n=50)
  a, b, c = _mask(ids, (4, 5)), _mask(ids, (4, 5)), _mask(ids, (4, 6))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])


def test_regular_ids():
  np.testing.assert_array_equal(masking.regular_ids(6, [0, 3, 5]), [1, 2, 4])
