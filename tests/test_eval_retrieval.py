"""Retrieval recall@K and the two-stage (top-k) ranking, against hand-computed ranks and
sort-based references."""

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


# ------------------------------------------------------------- two-stage (top-k) ranking

# First-stage similarities for the 3 x 6 gallery above; top_k = 2 keeps, per query:
#   image 0: t0 (0.9), t2 (0.8)   image 1: t4 (0.9), t1 (0.7)   image 2: t4, t5 (tie 0.5)
#   t0: images 0, 2   t1: 1, 2   t2: 0, 1   t3: 1 and 0 (0 and 2 tie at 0.1: lower index)
#   t4: 1, 2   t5: 2, 1
SIMILARITY = np.array([
    [0.9, 0.2, 0.8, 0.1, 0.3, 0.0],
    [0.1, 0.7, 0.6, 0.5, 0.9, 0.2],
    [0.3, 0.4, 0.2, 0.1, 0.5, 0.5],
])
# Second-stage (ITM) scores of every pair; a query may only use those of its candidates.
ITM = np.array([
    [0.2, 0.9, 0.7, 0.0, 0.1, 0.4],
    [0.3, 0.8, 0.5, 0.6, 0.1, 0.9],
    [0.6, 0.0, 0.2, 0.3, 0.4, 0.1],
])


def test_candidate_pairs_by_hand():
  i2t, t2i = retrieval.candidate_pairs(SIMILARITY, 2)
  np.testing.assert_array_equal(i2t, [[1, 0, 1, 0, 0, 0],
                                      [0, 1, 0, 0, 1, 0],
                                      [0, 0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(t2i, [[1, 0, 1, 1, 0, 0],
                                      [0, 1, 1, 1, 1, 1],
                                      [1, 1, 0, 0, 1, 1]])
  assert (i2t | t2i).sum() == 12  # ITM passes instead of 18
  with pytest.raises(ValueError, match='top_k=-1'):
    retrieval.candidate_pairs(SIMILARITY, -1)


def test_top_k_ranking_by_hand():
  # image -> text, candidates ordered by ITM:
  #   image 0: t2 (0.7), t0 (0.2, GT) -> rank 1 (t1, a GT at 0.9, was filtered out)
  #   image 1: t1 (0.8), t4 (0.1), neither GT -> after all 4 non-GT texts: rank 4
  #   image 2: t4 (0.4, GT) first -> rank 0 (t0's 0.6 is not a candidate)
  # text -> image: t0: 2 (0.6) > 0 (0.2, GT) -> 1; t1: GT 0 filtered -> after both others
  #   -> 2; t2: 0 (0.7) > 1 (0.5, GT) -> 1; t3: 1 (0.6, GT) -> 0; t4: 2 (0.4) > 1 -> 0;
  #   t5: 1 (0.9) > 2 (0.1, GT) -> 1.
  i2t_ranks, t2i_ranks = np.array([1, 4, 0]), np.array([1, 2, 1, 0, 0, 1])
  expected = {}
  for name, ranks in (('i2t', i2t_ranks), ('t2i', t2i_ranks)):
    expected.update({f'{name}_r{k}': 100 * np.mean(ranks < k) for k in (1, 2, 5)})
  expected['rsum'] = sum(expected.values())
  # i2t: 1/3, 2/3, 3/3 (rank 4 < 5: ranking after every candidate still ranks 5th);
  # t2i: 2/6, 5/6, 6/6.
  assert expected == pytest.approx({'i2t_r1': 100 / 3, 'i2t_r2': 200 / 3, 'i2t_r5': 100.0,
                                    't2i_r1': 100 / 3, 't2i_r2': 500 / 6, 't2i_r5': 100.0,
                                    'rsum': 100 / 3 + 200 / 3 + 100 + 100 / 3 + 500 / 6 + 100})
  got = retrieval.recall_from_candidates(
      ITM, *retrieval.candidate_pairs(SIMILARITY, 2), TEXT_TO_IMAGE, ks=(1, 2, 5))
  assert got == pytest.approx(expected)
  # Ranking every pair by the same scores gives other ranks: the filter matters.
  np.testing.assert_array_equal(retrieval.i2t_ranks(ITM, TEXT_TO_IMAGE), [0, 2, 1])


def _brute_force_ranks(similarity, scores, text_to_image, top_k):
  """Per query: keep its top_k by similarity (sorted() by (-sim, index)), sort those by
  score with non-GT before GT on ties, and rank the first GT; with no GT kept, rank after
  every non-GT candidate of the whole gallery (they all tie below the kept ones)."""
  def rank(sim_row, score_row, is_gt):
    kept = sorted(range(len(sim_row)), key=lambda j: (-sim_row[j], j))[:top_k]
    order = sorted(kept, key=lambda j: (-score_row[j], bool(is_gt[j])))
    hits = [n for n, j in enumerate(order) if is_gt[j]]
    return hits[0] if hits else int((~is_gt).sum())

  i2t = [rank(similarity[i], scores[i], text_to_image == i)
         for i in range(similarity.shape[0])]
  t2i = [rank(similarity[:, t], scores[:, t], np.arange(similarity.shape[0]) == text_to_image[t])
         for t in range(similarity.shape[1])]
  return np.array(i2t), np.array(t2i)


@pytest.mark.parametrize('top_k', [1, 3, 7])
def test_top_k_ranking_matches_brute_force_with_ties(top_k):
  rng = np.random.default_rng(top_k)
  text_to_image = np.repeat(np.arange(10), 5)
  similarity = rng.integers(0, 4, size=(10, 50)).astype(np.float64)  # ties in the filter
  scores = rng.integers(0, 6, size=(10, 50)).astype(np.float64)  # and in the ranking
  i2t, t2i = _brute_force_ranks(similarity, scores, text_to_image, top_k)
  got = retrieval.recall_from_candidates(
      scores, *retrieval.candidate_pairs(similarity, top_k), text_to_image, ks=(1, 5, 10))
  for k in (1, 5, 10):
    assert got[f'i2t_r{k}'] == pytest.approx(100 * np.mean(i2t < k)), k
    assert got[f't2i_r{k}'] == pytest.approx(100 * np.mean(t2i < k)), k


def test_top_k_covering_the_gallery_equals_full_ranking():
  rng = np.random.default_rng(3)
  text_to_image = np.repeat(np.arange(4), 3)
  similarity, scores = rng.normal(size=(2, 4, 12))
  full = retrieval.retrieval_recall(scores, text_to_image)
  for top_k in (0, 12, 50):  # 0 = keep all; >= 12 texts and >= 4 images
    i2t, t2i = retrieval.candidate_pairs(similarity, top_k)
    assert i2t.all() and t2i.all()
    assert retrieval.recall_from_candidates(scores, i2t, t2i, text_to_image) == full
  # 4 <= k < 12 filters only image -> text; text -> image recalls stay exact.
  i2t, t2i = retrieval.candidate_pairs(similarity, 4)
  assert (i2t.sum(axis=1) == 4).all() and t2i.all()
  got = retrieval.recall_from_candidates(scores, i2t, t2i, text_to_image)
  assert {k: v for k, v in got.items() if k.startswith('t2i')} == {
      k: v for k, v in full.items() if k.startswith('t2i')}


def test_candidates_with_wrong_shape_raise():
  i2t, t2i = retrieval.candidate_pairs(SIMILARITY, 2)
  with pytest.raises(ValueError, match=r'i2t candidates have shape \(3, 5\)'):
    retrieval.recall_from_candidates(ITM, i2t[:, :5], t2i, TEXT_TO_IMAGE)
