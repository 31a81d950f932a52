"""Image-text retrieval recall@K (Flickr30K / COCO protocol, e.g. VSE++, UNITER).

Inputs are a score matrix `[num_images, num_texts]` (higher = more similar, e.g. the ITM
score) and `text_to_image [num_texts]`, the image each text describes (5 texts per image
in Flickr30K and COCO).

* image -> text: an image's rank is that of its best-ranked ground-truth text;
* text -> image: a text's rank is that of its one image.

Ranks are 0-based and ties are pessimistic: a candidate that is not ground truth counts
as ranked above the ground truth when its score is greater *or equal*, so a constant
score matrix gives recall 0 rather than credit for luck of the sort order. Ties between
two ground-truth texts of one image do not matter (either is a hit).
Recalls are in percent; `rsum` is the sum of all of them (six at the default K = 1, 5, 10).

Two-stage ranking (`candidate_pairs`, `recall_from_candidates`): a cheap first-stage
similarity picks each query's top-k candidates, only those get the expensive score, and
each query ranks its candidates by that score; what it did not retain ranks after all of
them, tied (so pessimistically ahead of a ground truth that was not retained either).
"""

from typing import Sequence

import numpy as np


def _check(scores: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, dtype=np.float64)
  text_to_image = np.asarray(text_to_image)
  if scores.ndim != 2:
    raise ValueError(f'scores must be [num_images, num_texts]; got shape {scores.shape}.')
  num_images, num_texts = scores.shape
  if text_to_image.shape != (num_texts,):
    raise ValueError(f'text_to_image must be [num_texts] = [{num_texts}] (one image index '
                     f'per score column); got shape {text_to_image.shape}.')
  if not np.issubdtype(text_to_image.dtype, np.integer):
    raise ValueError(f'text_to_image must hold integer image indices; got {text_to_image.dtype}.')
  if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
    raise ValueError(f'text_to_image values must index the {num_images} score rows; got '
                     f'range [{text_to_image.min()}, {text_to_image.max()}].')
  if np.isnan(scores).any():
    raise ValueError('scores contain NaN; ranks would be undefined. Check the model outputs.')
  return scores, text_to_image


def i2t_ranks(scores: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
  """0-based pessimistic rank of each image's best ground-truth text.

  Args:
    scores: `[I, T]` image-text similarities.
    text_to_image: `[T]` int, the image index of each text.

  Returns:
    `[I]` int: the number of non-ground-truth texts scoring >= the image's best
    ground-truth text.
  """
  scores, text_to_image = _check(scores, text_to_image)
  num_images, num_texts = scores.shape
  empty = np.flatnonzero(np.bincount(text_to_image, minlength=num_images) == 0)
  if empty.size:
    raise ValueError(f'{len(empty)} images have no ground-truth text (e.g. rows '
                     f'{empty[:5].tolist()}); image->text recall is undefined for them.')
  gt_scores = scores[text_to_image, np.arange(num_texts)]  # [T]
  best = np.full(num_images, -np.inf)
  np.maximum.at(best, text_to_image, gt_scores)
  at_or_above = (scores >= best[:, None]).sum(axis=1)  # [I], includes tied GT texts
  gt_at_or_above = np.bincount(text_to_image, weights=gt_scores >= best[text_to_image],
                               minlength=num_images)
  return at_or_above - gt_at_or_above.astype(np.int64)


def t2i_ranks(scores: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
  """0-based pessimistic rank of each text's image.

  Args:
    scores: `[I, T]` image-text similarities.
    text_to_image: `[T]` int, the image index of each text.

  Returns:
    `[T]` int: the number of other images scoring >= the text's own image.
  """
  scores, text_to_image = _check(scores, text_to_image)
  gt_scores = scores[text_to_image, np.arange(scores.shape[1])]  # [T]
  return (scores >= gt_scores[None, :]).sum(axis=0) - 1


def retrieval_recall(scores: np.ndarray, text_to_image: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@K in percent for both directions, and their sum.

  Args:
    scores: `[I, T]` image-text similarities.
    text_to_image: `[T]` int, the image index of each text.
    ks: the K values.

  Returns:
    `{'i2t_r1': ..., 'i2t_r5': ..., 'i2t_r10': ..., 't2i_r1': ..., 't2i_r5': ...,
    't2i_r10': ..., 'rsum': ...}` (keys follow `ks`).
  """
  i2t = i2t_ranks(scores, text_to_image)
  t2i = t2i_ranks(scores, text_to_image)
  metrics = {}
  for direction, ranks in (('i2t', i2t), ('t2i', t2i)):
    for k in ks:
      metrics[f'{direction}_r{k}'] = 100.0 * float(np.mean(ranks < k))
  metrics['rsum'] = rsum(metrics)
  return metrics


def rsum(metrics: dict[str, float]) -> float:
  """Sum of the recall@K entries (`i2t_r*`, `t2i_r*`) of a `retrieval_recall` result."""
  return float(sum(v for k, v in metrics.items() if k.startswith(('i2t_r', 't2i_r'))))


def candidate_pairs(similarity: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
  """The pairs each direction re-ranks: the top_k texts of each image, images of each text.

  Args:
    similarity: `[I, T]` first-stage image-text similarities.
    top_k: candidates per query; 0, or at least the gallery size, keeps every pair. Ties
      keep the lower index.

  Returns:
    (`[I, T]` bool, the image->text candidates; `[I, T]` bool, the text->image ones).
  """
  similarity = np.asarray(similarity)
  if top_k < 0:
    raise ValueError(f'top_k={top_k} must be >= 0 (0 keeps every pair).')
  num_images, num_texts = similarity.shape
  i2t = np.ones(similarity.shape, bool)
  t2i = np.ones(similarity.shape, bool)
  if top_k and top_k < num_texts:
    i2t[:] = False
    best = np.argsort(-similarity, axis=1, kind='stable')[:, :top_k]
    np.put_along_axis(i2t, best, True, axis=1)
  if top_k and top_k < num_images:
    t2i[:] = False
    best = np.argsort(-similarity, axis=0, kind='stable')[:top_k]
    np.put_along_axis(t2i, best, True, axis=0)
  return i2t, t2i


def recall_from_candidates(scores: np.ndarray, i2t: np.ndarray, t2i: np.ndarray,
                           text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                           ) -> dict[str, float]:
  """Recall@K both ways when each query ranks only its candidates by `scores`.

  Args:
    scores: `[I, T]` second-stage scores; entries outside both candidate sets are unused
      (they may be anything but NaN, e.g. -inf where never computed).
    i2t, t2i: `[I, T]` bool candidates of `candidate_pairs`.
    text_to_image: `[T]` int, the image index of each text.
    ks: the K values.

  Returns:
    As `retrieval_recall`.
  """
  scores = np.asarray(scores, np.float64)
  for name, keep in (('i2t', i2t), ('t2i', t2i)):
    if np.shape(keep) != scores.shape:
      raise ValueError(f'{name} candidates have shape {np.shape(keep)}; scores {scores.shape}.')
  out = {}
  for name, keep in (('i2t', i2t), ('t2i', t2i)):
    recall = retrieval_recall(np.where(keep, scores, -np.inf), text_to_image, ks)
    out.update({k: v for k, v in recall.items() if k.startswith(name)})
  out['rsum'] = rsum(out)
  return out
