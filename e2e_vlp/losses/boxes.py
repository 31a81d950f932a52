"""Box formats, areas, IoU and generalized IoU (Rezatofighi et al., 2019).

Boxes are `[..., 4]` arrays, either centre form `(cx, cy, w, h)` or corner form
`(x0, y0, x1, y1)`. Every ratio divides by `max(denominator, EPS)`: exact for real boxes,
and zero-area or inverted boxes (a freshly initialised box head can predict them) give 0
instead of 0/0, with finite gradients. Inverted sides (x1 < x0) count as zero length.
"""

import jax
import jax.numpy as jnp

EPS = 1e-9


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """`[..., 4]` (cx, cy, w, h) -> `[..., 4]` (x0, y0, x1, y1)."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """`[..., 4]` (x0, y0, x1, y1) -> `[..., 4]` (cx, cy, w, h)."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def area(boxes: jax.Array) -> jax.Array:
  """`[..., 4]` xyxy -> `[...]`; inverted boxes have zero area."""
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  return num / jnp.maximum(den, EPS)


def _iou_parts(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """IoU, union and enclosing-box area of broadcastable xyxy boxes `a`, `b`."""
  inter_lo = jnp.maximum(a[..., :2], b[..., :2])
  inter_hi = jnp.minimum(a[..., 2:], b[..., 2:])
  inter_wh = jnp.maximum(inter_hi - inter_lo, 0.0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = area(a) + area(b) - inter
  hull_wh = jnp.maximum(
      jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0.0)
  hull = hull_wh[..., 0] * hull_wh[..., 1]
  return _safe_div(inter, union), union, hull


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise IoU of xyxy boxes: `[..., 4]` x `[..., 4]` -> `[...]`."""
  return _iou_parts(a, b)[0]


def giou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise generalized IoU in [-1, 1] of xyxy boxes: `[..., 4]` x `[..., 4]` -> `[...]`."""
  ious, union, hull = _iou_parts(a, b)
  return ious - _safe_div(hull - union, hull)


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of every pair of xyxy boxes: `[..., N, 4]` x `[..., M, 4]` -> `[..., N, M]`."""
  return iou(a[..., :, None, :], b[..., None, :, :])


def pairwise_giou(a: jax.Array, b: jax.Array) -> jax.Array:
  """GIoU of every pair of xyxy boxes: `[..., N, 4]` x `[..., M, 4]` -> `[..., N, M]`."""
  return giou(a[..., :, None, :], b[..., None, :, :])
