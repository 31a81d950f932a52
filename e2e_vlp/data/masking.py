"""BERT masked-language-model corruption of padded token ids, with stateless randomness.

Each token that is neither special nor padding is selected with probability `mlm_prob`; a
selected token becomes [MASK] 80% of the time, a random non-special token 10% and stays
unchanged 10% (Devlin et al., 2019). Labels hold the original id where selected, -1 elsewhere.
"""

from typing import Iterable

import numpy as np
import tensorflow as tf

IGNORE_LABEL = -1
MASK_FRACTION = 0.8  # BERT
RANDOM_FRACTION = 0.1  # BERT; the remaining 10% stay unchanged


def regular_ids(vocab_size: int, special_ids: Iterable[int]) -> np.ndarray:
  """The ids a random replacement may take: every id that is not special, [V - #special]."""
  ids = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), np.int64))
  if ids.size == 0:
    raise ValueError(f'All {vocab_size} ids are special; the vocabulary has no regular token.')
  return ids.astype(np.int32)


def mask_tokens(ids: tf.Tensor, seed: tf.Tensor, *, mlm_prob: float, mask_id: int,
                vocab_size: int, special_ids: Iterable[int]) -> tuple[tf.Tensor, tf.Tensor]:
  """Applies BERT masking to `ids`.

  Args:
    ids: [..., L] int32 token ids, padding included (padding must be in `special_ids`).
    seed: [2] integer stateless seed.
    mlm_prob: probability that a maskable token is selected.
    mask_id: id of [MASK].
    vocab_size: vocabulary size (random replacements are drawn below it).
    special_ids: ids never selected nor drawn as replacements ([PAD], [CLS], [SEP], ...).

  Returns:
    (masked ids [..., L] int32, labels [..., L] int32: the original id where selected, else -1).
  """
  ids = tf.convert_to_tensor(ids, tf.int32)
  special_ids = list(special_ids)
  regular = tf.constant(regular_ids(vocab_size, special_ids))
  seed_select, seed_action, seed_random = tf.unstack(tf.random.split(seed, 3))
  shape = tf.shape(ids)
  maskable = tf.reduce_all(ids[..., None] != tf.constant(special_ids, tf.int32), axis=-1)
  selected = maskable & (tf.random.stateless_uniform(shape, seed_select) < mlm_prob)
  action = tf.random.stateless_uniform(shape, seed_action)
  random_ids = tf.gather(regular, tf.random.stateless_uniform(
      shape, seed_random, minval=0, maxval=regular.shape[0], dtype=tf.int32))
  masked = tf.where(action < MASK_FRACTION, mask_id,
                    tf.where(action < MASK_FRACTION + RANDOM_FRACTION, random_ids, ids))
  return tf.where(selected, masked, ids), tf.where(selected, ids, IGNORE_LABEL)
