"""Box conversions, IoU and GIoU against hand-computed values and a numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2e_vlp.losses import boxes as box_ops

# (a, b, iou, giou) in xyxy, worked out by hand: intersection, union, enclosing box.
HAND_CASES = {
    # inter 1, union 4 + 4 - 1 = 7, hull 3x3 = 9.
    'overlapping': ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),
    # inter 0, union 2, hull 3x1 = 3.
    'disjoint': ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),
    # b inside a: inter 1, union 16, hull = a.
    'nested': ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16, 1 / 16),
    'identical': ([0.1, 0.2, 0.5, 0.9], [0.1, 0.2, 0.5, 0.9], 1.0, 1.0),
    # A point inside a box: inter 0, union 4, hull = the box.
    'point_in_box': ([1, 1, 1, 1], [0, 0, 2, 2], 0.0, 0.0),
    # Two identical points: union 0 and hull 0, both ratios defined as 0.
    'same_point': ([1, 1, 1, 1], [1, 1, 1, 1], 0.0, 0.0),
    # A zero-height line along a box's edge: inter 0, union 4, hull = the box.
    'line_on_edge': ([0, 0, 2, 0], [0, 0, 2, 2], 0.0, 0.0),
    # Disjoint points: union 0, hull 2x2 = 4, so GIoU = 0 - (4 - 0) / 4.
    'two_points': ([0, 0, 0, 0], [2, 2, 2, 2], 0.0, -1.0),
}


_iou_giou = jax.jit(lambda a, b: (box_ops.iou(a, b), box_ops.giou(a, b)))


@pytest.mark.parametrize('name', sorted(HAND_CASES))
def test_iou_and_giou_match_hand_values(name):
  a, b, want_iou, want_giou = HAND_CASES[name]
  # Both orders at once: the measures are symmetric.
  x = jnp.asarray([a, b], jnp.float32)
  y = jnp.asarray([b, a], jnp.float32)
  ious, gious = _iou_giou(x, y)
  np.testing.assert_allclose(ious, [want_iou] * 2, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(gious, [want_giou] * 2, rtol=1e-6, atol=1e-7)


def test_conversions_round_trip_and_area():
  cxcywh = jnp.asarray([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.1]])
  xyxy = box_ops.cxcywh_to_xyxy(cxcywh)
  np.testing.assert_allclose(xyxy, [[0.4, 0.3, 0.6, 0.7], [0.1, 0.85, 0.1, 0.95]], atol=1e-7)
  np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-7)
  np.testing.assert_allclose(box_ops.area(xyxy), [0.08, 0.0], atol=1e-7)
  # Inverted boxes count as empty rather than negative.
  np.testing.assert_allclose(box_ops.area(jnp.asarray([2.0, 0.0, 1.0, 1.0])), 0.0)


def _numpy_giou(a, b):
  """Direct transcription of the GIoU definition for one pair (float64)."""
  area = lambda x: max(x[2] - x[0], 0) * max(x[3] - x[1], 0)
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
  inter = iw * ih
  union = area(a) + area(b) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union, inter / union - (hull - union) / hull


def test_pairwise_matches_numpy_loop_with_batch_dims():
  rng = np.random.default_rng(0)
  def random_boxes(shape):
    cxcy, wh = rng.uniform(0.2, 0.8, shape + (2,)), rng.uniform(0.05, 0.5, shape + (2,))
    return np.concatenate([cxcy - wh / 2, cxcy + wh / 2], -1)
  a, b = random_boxes((2, 5)), random_boxes((2, 3))
  pairwise = jax.jit(lambda a, b: (box_ops.pairwise_iou(a, b), box_ops.pairwise_giou(a, b)))
  ious, gious = pairwise(a.astype(np.float32), b.astype(np.float32))
  assert ious.shape == gious.shape == (2, 5, 3)
  want = np.array([[[_numpy_giou(a[k, i], b[k, j]) for j in range(3)] for i in range(5)]
                   for k in range(2)])
  np.testing.assert_allclose(ious, want[..., 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gious, want[..., 1], rtol=1e-5, atol=1e-6)
  assert (ious > 0).any() and (gious < 0).any()  # both regimes covered


def test_gradients_are_finite_for_degenerate_boxes():
  # cxcywh predictions: zero width, zero height, a point, and a normal box; targets
  # include the same degenerate shapes so that union and hull can both be 0.
  pred = jnp.asarray([[0.5, 0.5, 0.0, 0.3], [0.5, 0.5, 0.2, 0.0], [0.3, 0.3, 0.0, 0.0],
                      [0.3, 0.3, 0.0, 0.0], [0.5, 0.5, 0.2, 0.2]])
  target = jnp.asarray([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.0, 0.0],
                        [0.7, 0.7, 0.0, 0.0], [0.5, 0.5, 0.2, 0.2]])
  def loss(p, t):
    p, t = box_ops.cxcywh_to_xyxy(p), box_ops.cxcywh_to_xyxy(t)
    return ((1 - box_ops.giou(p, t)).sum() + box_ops.pairwise_giou(p, t).sum()
            + box_ops.pairwise_iou(p, t).sum())
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(pred, target)
  assert np.isfinite(value)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  # A normal pair still gets a real gradient.
  assert np.abs(np.asarray(grads[0])).sum() > 0
