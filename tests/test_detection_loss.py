"""Set-prediction loss against a PyTorch transcription of DETR's SetCriterion, and the
per-cell class loss against a numpy loop."""

import functools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import optimize

from configs import pretrain
from e2e_vlp.losses import detection

LAYERS, BATCH, QUERIES, CLASSES, ATTRS, MAX_BOXES, K = 3, 4, 7, 5, 6, 4, 2
BOXES_PER_IMAGE = (0, 2, 4, 1)  # image 0 has no box; the others are padded to MAX_BOXES


def _det_config(**overrides):
  det = pretrain.get_config('tiny').loss.det
  det.loss_attr = 0.5  # not 1, so that a missing weight would show
  for key, value in overrides.items():
    det[key] = value
  return det


def _random_problem(seed: int):
  rng = np.random.default_rng(seed)
  outputs = {
      'det_class_logits': rng.normal(size=(LAYERS, BATCH, QUERIES, CLASSES + 1)),
      'det_attr_logits': rng.normal(size=(LAYERS, BATCH, QUERIES, ATTRS)),
      'det_boxes': np.concatenate([rng.uniform(0.2, 0.8, (LAYERS, BATCH, QUERIES, 2)),
                                   rng.uniform(0.05, 0.4, (LAYERS, BATCH, QUERIES, 2))], -1),
  }
  outputs = {k: v.astype(np.float32) for k, v in outputs.items()}
  box_mask = np.arange(MAX_BOXES)[None, :] < np.asarray(BOXES_PER_IMAGE)[:, None]
  attributes = rng.integers(0, ATTRS, (BATCH, MAX_BOXES, K))
  attributes[rng.random((BATCH, MAX_BOXES, K)) < 0.3] = -1  # some boxes have fewer
  batch = {
      'boxes': np.concatenate([rng.uniform(0.2, 0.8, (BATCH, MAX_BOXES, 2)),
                               rng.uniform(0.05, 0.4, (BATCH, MAX_BOXES, 2))],
                              -1).astype(np.float32),
      'labels': rng.integers(0, CLASSES, (BATCH, MAX_BOXES)).astype(np.int32),
      'attributes': attributes.astype(np.int32),
      'box_mask': box_mask,
  }
  # Padding rows carry garbage that must not matter.
  batch['boxes'][~box_mask] = 7.0
  batch['labels'][~box_mask] = 99
  batch['attributes'][~box_mask] = 3
  return outputs, batch


# ---- An independent reference: DETR's HungarianMatcher + SetCriterion, per image lists.

def _xyxy(b):
  return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1)


def _generalized_box_iou(a, b):
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  wh = (torch.min(a[:, None, 2:], b[None, :, 2:]) - torch.max(a[:, None, :2], b[None, :, :2]))
  inter = wh.clamp(min=0).prod(-1)
  union = area_a[:, None] + area_b[None, :] - inter
  hull = (torch.max(a[:, None, 2:], b[None, :, 2:])
          - torch.min(a[:, None, :2], b[None, :, :2])).prod(-1)
  return inter / union - (hull - union) / hull


def _reference(outputs, batch, det, aux_loss):
  targets = []
  for b in range(BATCH):
    n = BOXES_PER_IMAGE[b]
    targets.append({k: torch.tensor(batch[k][b, :n]) for k in ('boxes', 'labels', 'attributes')})
  num_boxes = max(sum(BOXES_PER_IMAGE), 1)
  layers = range(LAYERS) if aux_loss else [LAYERS - 1]
  total, last = 0.0, None
  for d in layers:
    logits = torch.tensor(outputs['det_class_logits'][d], dtype=torch.float64)
    attr_logits = torch.tensor(outputs['det_attr_logits'][d], dtype=torch.float64)
    pred = torch.tensor(outputs['det_boxes'][d], dtype=torch.float64)
    indices = []
    for b, t in enumerate(targets):
      tgt_boxes = t['boxes'].double()
      cost = (det.cost_bbox * torch.cdist(pred[b], tgt_boxes, p=1)
              - det.cost_class * logits[b].softmax(-1)[:, t['labels']]
              - det.cost_giou * _generalized_box_iou(_xyxy(pred[b]), _xyxy(tgt_boxes)))
      rows, cols = optimize.linear_sum_assignment(cost.numpy())
      indices.append((torch.as_tensor(rows, dtype=torch.long),
                      torch.as_tensor(cols, dtype=torch.long)))
    batch_idx = torch.cat([torch.full_like(i, b) for b, (i, _) in enumerate(indices)])
    src_idx = torch.cat([i for i, _ in indices])
    target_classes = torch.full((BATCH, QUERIES), CLASSES, dtype=torch.long)
    classes_o = torch.cat([t['labels'][j].long() for t, (_, j) in zip(targets, indices)])
    target_classes[batch_idx, src_idx] = classes_o
    empty_weight = torch.ones(CLASSES + 1, dtype=torch.float64)
    empty_weight[-1] = det.eos_coef
    loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, empty_weight)
    src_boxes = pred[batch_idx, src_idx]
    tgt_boxes = torch.cat([t['boxes'][j] for t, (_, j) in zip(targets, indices)]).double()
    loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction='none').sum() / num_boxes
    loss_giou = (1 - torch.diag(_generalized_box_iou(_xyxy(src_boxes), _xyxy(tgt_boxes)))
                 ).sum() / num_boxes
    src_attr = attr_logits[batch_idx, src_idx]
    tgt_attr = torch.cat([t['attributes'][j] for t, (_, j) in zip(targets, indices)]).long()
    attr_sum = sum(F.cross_entropy(src_attr, tgt_attr[:, k], ignore_index=-1, reduction='sum')
                   for k in range(K))
    loss_attr = attr_sum / (tgt_attr >= 0).sum()
    total += (det.loss_ce * loss_ce + det.loss_bbox * loss_bbox + det.loss_giou * loss_giou
              + det.loss_attr * loss_attr)
    accuracy = (logits[batch_idx, src_idx].argmax(-1) == classes_o).double().mean()
    last = {'loss_ce': loss_ce, 'loss_bbox': loss_bbox, 'loss_giou': loss_giou,
            'loss_attr': loss_attr, 'det_class_accuracy': accuracy}
  return float(total), {k: float(v) for k, v in last.items()}


@functools.partial(jax.jit, static_argnums=2)
def _loss(outputs, batch, det):
  return detection.set_prediction_loss(outputs, batch, det)


class _Hashable:
  """Wraps the ConfigDict as a static jit argument; equal configs share a compilation."""

  def __init__(self, det):
    self.det = det
    self._key = tuple(sorted(det.items()))

  def __getattr__(self, name):
    return getattr(self.det, name)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Hashable) and self._key == other._key


@pytest.mark.parametrize('matcher,aux_loss,seed', [
    ('hungarian', True, 0), ('hungarian', False, 1), ('scipy', True, 2)])
def test_matches_detr_reference(matcher, aux_loss, seed):
  outputs, batch = _random_problem(seed)
  det = _det_config(matcher=matcher, aux_loss=aux_loss)
  loss, metrics = _loss(outputs, batch, _Hashable(det))
  want_total, want_metrics = _reference(outputs, batch, det, aux_loss)
  np.testing.assert_allclose(loss, want_total, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics['det_loss'], want_total, rtol=1e-5, atol=1e-5)
  for key, want in want_metrics.items():
    np.testing.assert_allclose(metrics[key], want, rtol=1e-5, atol=1e-5, err_msg=key)


def test_invariant_to_query_permutation_and_gradients_finite():
  outputs, batch = _random_problem(3)
  batch['boxes'][~batch['box_mask']] = np.nan  # padding must not leak into gradients
  det = _Hashable(_det_config())
  perm = np.random.default_rng(0).permutation(QUERIES)
  permuted = {k: v[:, :, perm] for k, v in outputs.items()}
  value_and_grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=2)
  (loss, metrics), grads = value_and_grad(outputs, batch, det)
  loss_p, metrics_p = _loss(permuted, batch, det)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
  for key in metrics:
    np.testing.assert_allclose(metrics_p[key], metrics[key], rtol=1e-6, atol=1e-7)
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(grads['det_boxes'])).sum() > 0


def test_same_loss_with_the_batch_sharded_over_a_mesh():
  if jax.device_count() < BATCH:
    pytest.skip('needs the virtual CPU devices that conftest.py sets up')
  outputs, batch = _random_problem(5)
  det = _Hashable(_det_config())
  want, _ = _loss(outputs, batch, det)
  mesh = jax.make_mesh((BATCH,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:BATCH])
  by_example = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  by_layer_example = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))
  with jax.set_mesh(mesh):
    args = (jax.device_put(outputs, by_layer_example), jax.device_put(batch, by_example), det)
    got, _ = _loss(*args)
    lowered = _loss.lower(*args).as_text()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert 'manual_computation' in lowered  # the matcher ran per device (jax.shard_map)


def test_bad_shapes_say_what_was_expected():
  outputs, batch = _random_problem(4)
  det = _det_config()
  with pytest.raises(ValueError, match=r'batch\["boxes"\] should have shape \[4, M, 4\]'):
    detection.set_prediction_loss(outputs, dict(batch, boxes=batch['boxes'][..., :3]), det)
  with pytest.raises(ValueError, match=r'batch\["labels"\] should have shape \[4, 4\]'):
    detection.set_prediction_loss(outputs, dict(batch, labels=batch['labels'][:, :2]), det)
  with pytest.raises(ValueError, match=r'det_boxes.*\[3, 4, 7, 4\]'):
    detection.set_prediction_loss(dict(outputs, det_boxes=outputs['det_boxes'][0]), batch,
                                  det)


def test_cell_class_loss_matches_numpy():
  # Image 0: a big box (label 1) holding a small one (label 2), a padded box (label 3)
  # covering everything. Image 1: no real box.
  boxes = np.array([[[0.5, 0.5, 0.8, 0.8], [0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]],
                    [[0.5, 0.5, 1.0, 1.0], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
  labels = np.array([[1, 2, 3], [0, 0, 0]], np.int32)
  box_mask = np.array([[True, True, False], [False, False, False]])
  centers = np.array([[[0.3, 0.3], [0.7, 0.7], [0.95, 0.95], [0.4, 0.4]],
                      [[0.5, 0.5], [0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]], np.float32)
  # Image 0: small box, big box, outside both, the small box's corner (edges count).
  want_target = np.array([[2, 1, CLASSES, 2], [CLASSES] * 4])
  # Image 1 gains a box (label 4) narrower than the cell spacing, holding no cell centre:
  # the real cell nearest to its centre (0.14, 0.12) is cell 1 at (0.1, 0.1).
  boxes[1, 1], labels[1, 1], box_mask[1, 1] = [0.14, 0.12, 0.02, 0.02], 4, True
  want_target[1, 1] = 4
  visual_mask = np.array([[True, True, True, True], [True, True, False, False]])
  logits = np.random.default_rng(5).normal(size=(2, 4, CLASSES + 1)).astype(np.float32)
  logits[0, 0, 2] = 10.0  # two cells right, the rest by chance
  logits[1, 0, CLASSES] = 10.0
  batch = {'boxes': boxes, 'labels': labels, 'box_mask': box_mask}
  loss, metrics = jax.jit(detection.cell_class_loss)(logits, centers, visual_mask, batch)

  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = [-log_probs[b, n, want_target[b, n]] for b in range(2) for n in range(4)
        if visual_mask[b, n]]
  correct = [logits[b, n].argmax() == want_target[b, n] for b in range(2) for n in range(4)
             if visual_mask[b, n]]
  np.testing.assert_allclose(loss, np.mean(ce), rtol=1e-6)
  np.testing.assert_allclose(metrics['cell_accuracy'], np.mean(correct), rtol=1e-6)
  assert metrics['cell_loss'] == loss
