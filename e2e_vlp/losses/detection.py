"""DETR's set-prediction loss (Carion et al., 2020) and a per-cell class loss.

`set_prediction_loss` follows facebookresearch/detr's `SetCriterion` + `HungarianMatcher`:
every decoder layer is matched on its own, the class cross-entropy runs over all queries
with weight `eos_coef` on the no-object class, L1 and GIoU run over matched pairs and are
divided by the number of real boxes in the batch, and the auxiliary layers add the same
terms with the same weights. E2E-VLP adds an attribute cross-entropy on matched queries.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from e2e_vlp.losses import boxes as box_ops
from e2e_vlp.losses import matching

Metrics = dict[str, jax.Array]


def _check_shape(name: str, x: jax.Array, expected: tuple[int | str, ...]) -> None:
  """Raises if `x` is not `expected`; a str entry names a size that may be anything."""
  ok = x.ndim == len(expected) and all(
      isinstance(e, str) or e == s for s, e in zip(x.shape, expected))
  if not ok:
    want = ', '.join(str(e) for e in expected)
    raise ValueError(f'{name} should have shape [{want}], got {tuple(x.shape)}.')


def _weighted_mean(values: jax.Array, weights: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """sum(w v) / max(sum(w), tiny) over `axes`; 0 when every weight is 0."""
  return (values * weights).sum(axes) / jnp.maximum(weights.sum(axes), 1e-12)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`[..., C]` float32 logits, `[...]` int labels (clipped into range) -> `[...]` CE."""
  labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def _gather_targets(values: jax.Array, index: jax.Array) -> jax.Array:
  """`[B, M, ...]` per-target values, `[D, B, Q]` target index -> `[D, B, Q, ...]`."""
  return jax.vmap(lambda idx: jax.vmap(lambda v, i: v[i])(values, idx))(index)


def set_prediction_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                        det_config: Any) -> tuple[jax.Array, Metrics]:
  """DETR's Hungarian set loss summed over decoder layers.

  Args:
    outputs: `det_class_logits` [D, B, Q, C+1] (last class = no-object), `det_boxes`
      [D, B, Q, 4] sigmoid cxcywh, optionally `det_attr_logits` [D, B, Q, A]; layer -1 is
      the final layer.
    batch: `boxes` [B, M, 4] normalized cxcywh, `labels` [B, M] int, `box_mask` [B, M]
      bool, optionally `attributes` [B, M, K] or [B, M] int (-1 = none). The attribute
      term is computed only when both attribute arrays are present.
    det_config: `config.loss.det` (cost_*, loss_*, eos_coef, aux_loss, matcher).

  Returns:
    The weighted total, and metrics of the final layer: loss_ce, loss_bbox, loss_giou,
    loss_attr, det_class_accuracy (of matched queries), det_loss (the total).
  """
  class_logits = outputs['det_class_logits']
  pred_boxes = outputs['det_boxes']
  _check_shape('outputs["det_class_logits"]', class_logits, ('D', 'B', 'Q', 'C+1'))
  layers, batch_size, num_queries, num_classes_1 = class_logits.shape
  _check_shape('outputs["det_boxes"]', pred_boxes, (layers, batch_size, num_queries, 4))
  boxes, labels, box_mask = batch['boxes'], batch['labels'], batch['box_mask']
  _check_shape('batch["boxes"]', boxes, (batch_size, 'M', 4))
  max_boxes = boxes.shape[1]
  _check_shape('batch["labels"]', labels, (batch_size, max_boxes))
  _check_shape('batch["box_mask"]', box_mask, (batch_size, max_boxes))
  with_attributes = 'det_attr_logits' in outputs and 'attributes' in batch
  if with_attributes:
    attr_logits, attributes = outputs['det_attr_logits'], batch['attributes']
    _check_shape('outputs["det_attr_logits"]', attr_logits,
                 (layers, batch_size, num_queries, 'A'))
    if attributes.ndim == 2:
      attributes = attributes[..., None]
    _check_shape('batch["attributes"]', attributes, (batch_size, max_boxes, 'K'))

  if not det_config.aux_loss:
    class_logits, pred_boxes = class_logits[-1:], pred_boxes[-1:]
    if with_attributes:
      attr_logits = attr_logits[-1:]
    layers = 1
  class_logits = class_logits.astype(jnp.float32)
  pred_boxes = pred_boxes.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  box_mask = box_mask.astype(bool)
  labels = labels.astype(jnp.int32)
  no_object = num_classes_1 - 1

  # Match every layer at once: [D, B, Q, M] -> one batch of B * D problems, batch-major so
  # that a batch sharded over devices stays sharded (see matching.match).
  cost = jax.vmap(lambda logits, pred: matching.detr_cost(
      logits, pred, labels, boxes, cost_class=det_config.cost_class,
      cost_bbox=det_config.cost_bbox, cost_giou=det_config.cost_giou))(class_logits, pred_boxes)
  cost = jnp.moveaxis(cost, 0, 1).reshape(batch_size * layers, num_queries, max_boxes)
  valid = jnp.repeat(box_mask, layers, axis=0)
  target_for_query, _ = matching.match(cost, valid, method=det_config.matcher)
  target_for_query = jnp.moveaxis(
      target_for_query.reshape(batch_size, layers, num_queries), 1, 0)  # [D, B, Q]
  matched = target_for_query >= 0
  target_index = jnp.maximum(target_for_query, 0)

  # Under jit on global jax.Arrays this sum already runs over the whole global batch (XLA
  # inserts the cross-device reduction), so it is DETR's all-reduced box count: no psum.
  num_boxes = jnp.maximum(box_mask.sum().astype(jnp.float32), 1.0)
  per_query = (1, 2)  # reduce over B, Q and keep D

  target_classes = jnp.where(matched, _gather_targets(labels, target_index), no_object)
  class_weight = jnp.where(target_classes == no_object, det_config.eos_coef, 1.0)
  loss_ce = _weighted_mean(_cross_entropy(class_logits, target_classes), class_weight,
                           per_query)

  # Unmatched queries see a fixed unit box, so that padding rows (any values) cannot put a
  # NaN into the masked-out branch, whose gradient would still be 0 * NaN.
  target_boxes = jnp.where(matched[..., None], _gather_targets(boxes, target_index),
                           jnp.asarray([0.5, 0.5, 1.0, 1.0]))
  l1 = jnp.abs(pred_boxes - target_boxes).sum(-1)
  loss_bbox = jnp.where(matched, l1, 0.0).sum(per_query) / num_boxes
  giou = box_ops.giou(box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(target_boxes))
  loss_giou = jnp.where(matched, 1.0 - giou, 0.0).sum(per_query) / num_boxes

  if with_attributes:
    target_attrs = _gather_targets(attributes.astype(jnp.int32), target_index)  # [D,B,Q,K]
    attr_valid = matched[..., None] & (target_attrs >= 0)
    # Gather K labels from one [D, B, Q, A] log-normalizer instead of broadcasting the
    # logits to [D, B, Q, K, A] (that is ~0.7 GB at the base config's 400 attributes).
    attr_logits = attr_logits.astype(jnp.float32)
    picked = jnp.take_along_axis(
        attr_logits, jnp.clip(target_attrs, 0, attr_logits.shape[-1] - 1), axis=-1)
    attr_ce = jax.nn.logsumexp(attr_logits, axis=-1)[..., None] - picked
    loss_attr = _weighted_mean(attr_ce, attr_valid.astype(jnp.float32), (1, 2, 3))
  else:
    loss_attr = jnp.zeros((layers,), jnp.float32)

  per_layer = (det_config.loss_ce * loss_ce + det_config.loss_bbox * loss_bbox
               + det_config.loss_giou * loss_giou + det_config.loss_attr * loss_attr)
  total = per_layer.sum()
  correct = jnp.argmax(class_logits[-1], axis=-1) == target_classes[-1]
  accuracy = _weighted_mean(correct.astype(jnp.float32), matched[-1].astype(jnp.float32),
                            (0, 1))
  metrics = {
      'loss_ce': loss_ce[-1], 'loss_bbox': loss_bbox[-1], 'loss_giou': loss_giou[-1],
      'loss_attr': loss_attr[-1], 'det_class_accuracy': accuracy, 'det_loss': total,
  }
  return total, metrics


def cell_class_loss(cell_logits: jax.Array, cell_centers: jax.Array, visual_mask: jax.Array,
                    batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
  """Per-grid-cell classification: a dense signal that speeds up early detection training.

  A cell's target is the label of the smallest-area real box that contains its centre
  (edges included) or whose centre is nearest to it, else no-object (the last class).
  The second rule gives every object a positive cell: a box narrower than a cell often
  contains no cell centre, and without it would only teach "background" there.

  Args:
    cell_logits: `[B, N, C+1]`.
    cell_centers: `[B, N, 2]` (cx, cy) in the boxes' normalized coordinates.
    visual_mask: `[B, N]` bool, real (unpadded) cells.
    batch: `boxes` [B, M, 4] cxcywh, `labels` [B, M], `box_mask` [B, M].

  Returns:
    Mean cross-entropy over valid cells, and metrics cell_loss, cell_accuracy.
  """
  _check_shape('cell_logits', cell_logits, ('B', 'N', 'C+1'))
  batch_size, num_cells, num_classes_1 = cell_logits.shape
  _check_shape('cell_centers', cell_centers, (batch_size, num_cells, 2))
  _check_shape('visual_mask', visual_mask, (batch_size, num_cells))
  boxes, labels, box_mask = batch['boxes'], batch['labels'], batch['box_mask']
  _check_shape('batch["boxes"]', boxes, (batch_size, 'M', 4))
  _check_shape('batch["labels"]', labels, (batch_size, boxes.shape[1]))
  _check_shape('batch["box_mask"]', box_mask, (batch_size, boxes.shape[1]))

  corners = box_ops.cxcywh_to_xyxy(boxes.astype(jnp.float32))[:, None, :, :]  # [B, 1, M, 4]
  centers = cell_centers.astype(jnp.float32)[:, :, None, :]  # [B, N, 1, 2]
  inside = ((centers >= corners[..., :2]) & (centers <= corners[..., 2:])).all(-1)
  box_centers = boxes.astype(jnp.float32)[:, None, :, :2]  # [B, 1, M, 2]
  distance = jnp.sum((centers - box_centers) ** 2, axis=-1)  # [B, N, M]
  distance = jnp.where(visual_mask.astype(bool)[:, :, None], distance, jnp.inf)
  nearest = jnp.argmin(distance, axis=1)  # [B, M]: the cell nearest to each box centre
  inside |= jnp.arange(num_cells)[None, :, None] == nearest[:, None, :]
  inside &= box_mask.astype(bool)[:, None, :]  # [B, N, M]
  areas = jnp.where(inside, box_ops.area(corners), jnp.inf)
  smallest = jnp.argmin(areas, axis=-1)  # [B, N]
  target = jnp.where(inside.any(-1),
                     jnp.take_along_axis(labels.astype(jnp.int32), smallest, axis=1),
                     num_classes_1 - 1)
  logits = cell_logits.astype(jnp.float32)
  weight = visual_mask.astype(jnp.float32)
  loss = _weighted_mean(_cross_entropy(logits, target), weight, (0, 1))
  accuracy = _weighted_mean((jnp.argmax(logits, -1) == target).astype(jnp.float32), weight,
                            (0, 1))
  return loss, {'cell_loss': loss, 'cell_accuracy': accuracy}
