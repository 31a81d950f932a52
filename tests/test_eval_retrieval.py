"""Retrieval recall@K against hand-computed ranks and a sort-based reference."""

import numpy as np
import pytest

from e2e_vlp.eval import retrieval

# 3 images x 6 texts, texts (0, 1) -> image 0, (2, 3) -> 1, (4, 5) -> 2.
SCORES = np.array([
    [0.9, 0.1, 0.5, 0.9, 0.2, 0.3],
    [0.8, 0.1, 0.2, 0.7, 0.9, 0.1],
    [0.1, 0.2, 0.3, 0.4, 0.6, 0.6],
])
TEXT_TO_IMAGE = np.array([0, 0, 1, 1, 2, 2])


def test_ranks_by_hand():
  # Image 0: best GT t0 = 0.9 ties with non-GT t3 -> pessimistic rank 1.
  # Image 1: best GT t3 = 0.7 < t0 = 0.8, t4 = 0.9 -> rank 2.
  # Image 2: its two GT texts tie at 0.6 above every other text -> rank 0.
  np.testing.assert_array_equal(retrieval.i2t_ranks(SCORES, TEXT_TO_IMAGE), [1, 2, 0])
  # Column by column, other images scoring >= the own image; t1 ties with image 1 at 0.1.
  np.testing.assert_array_equal(retrieval.t2i_ranks(SCORES, TEXT_TO_IMAGE),
                                [0, 2, 2, 1, 1, 0])


def test_recall_by_hand():
  metrics = retrieval.retrieval_recall(SCORES, TEXT_TO_IMAGE, ks=(1, 2, 3))
  expected = {
      'i2t_r1': 100 / 3, 'i2t_r2': 200 / 3, 'i2t_r3': 100.0,
      't2i_r1': 200 / 6, 't2i_r2': 400 / 6, 't2i_r3': 100.0,
  }
  expected['rsum'] = sum(expected.values())
  assert metrics == pytest.approx(expected)
  assert retrieval.rsum(metrics) == pytest.approx(400.0)


def test_constant_scores_give_no_credit():
  metrics = retrieval.retrieval_recall(np.zeros((3, 6)), TEXT_TO_IMAGE, ks=(1, 4, 5))
  # Every non-GT candidate ties with the GT and counts above it: i2t rank 4, t2i rank 2.
  assert metrics == pytest.approx({'i2t_r1': 0.0, 'i2t_r4': 0.0, 'i2t_r5': 100.0,
                                   't2i_r1': 0.0, 't2i_r4': 100.0, 't2i_r5': 100.0,
                                   'rsum': 300.0})


def _reference_ranks(scores, text_to_image):
  """Sorts candidates by score, putting non-GT before GT on ties (pessimistic)."""
  i2t = []
  for i in range(scores.shape[0]):
    is_gt = text_to_image == i
    order = np.lexsort((is_gt, -scores[i]))  # primary key: score desc; then non-GT first
    i2t.append(int(np.flatnonzero(is_gt[order])[0]))
  t2i = []
  for t in range(scores.shape[1]):
    is_gt = np.arange(scores.shape[0]) == text_to_image[t]
    order = np.lexsort((is_gt, -scores[:, t]))
    t2i.append(int(np.flatnonzero(is_gt[order])[0]))
  return np.array(i2t), np.array(t2i)


def test_matches_sort_reference_with_many_ties():
  rng = np.random.default_rng(0)
  text_to_image = np.repeat(np.arange(12), 5)
  scores = rng.integers(0, 6, size=(12, 60)).astype(np.float32)  # coarse: many ties
  i2t, t2i = _reference_ranks(scores, text_to_image)
  np.testing.assert_array_equal(retrieval.i2t_ranks(scores, text_to_image), i2t)
  np.testing.assert_array_equal(retrieval.t2i_ranks(scores, text_to_image), t2i)
  metrics = retrieval.retrieval_recall(scores, text_to_image)
  for k in (1, 5, 10):
    assert metrics[f'i2t_r{k}'] == pytest.approx(100 * np.mean(i2t < k))
    assert metrics[f't2i_r{k}'] == pytest.approx(100 * np.mean(t2i < k))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='text_to_image must be'):
    retrieval.retrieval_recall(SCORES, TEXT_TO_IMAGE[:5])
  with pytest.raises(ValueError, match='no ground-truth text'):
    retrieval.i2t_ranks(SCORES, np.array([0, 0, 1, 1, 1, 1]))
  with pytest.raises(ValueError, match='NaN'):
    retrieval.t2i_ranks(np.full((3, 6), np.nan), TEXT_TO_IMAGE)
