"""COCO detection evaluation: DETR post-processing and hand-checkable AP values."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from scipy.special import softmax

from e2e_vlp.eval import coco_detection

NUM_CLASSES = 2
FAR_BOX = (0.95, 0.95, 0.04, 0.04)  # overlaps none of the ground-truth boxes below


def _outputs(detections_per_image, num_queries=4):
  """Model outputs from `[(class, logit, cxcywh), ...]` per image; other queries are
  confident no-object predictions of FAR_BOX. Returns logits [N, Q, C+1], boxes [N, Q, 4]."""
  n = len(detections_per_image)
  logits = np.zeros((n, num_queries, NUM_CLASSES + 1), np.float32)
  logits[..., -1] = 8.0
  boxes = np.tile(np.array(FAR_BOX, np.float32), (n, num_queries, 1))
  for i, detections in enumerate(detections_per_image):
    for q, (label, logit, box) in enumerate(detections):
      logits[i, q] = 0.0
      logits[i, q, label] = logit
      boxes[i, q] = box
  return logits, boxes


def _ground_truth(boxes_per_image, sizes):
  """`coco_ground_truth` from `[(class, cxcywh), ...]` per image, padded to 3 rows."""
  n = len(boxes_per_image)
  boxes = np.zeros((n, 3, 4), np.float32)
  labels = np.zeros((n, 3), np.int32)
  mask = np.zeros((n, 3), bool)
  for i, gt in enumerate(boxes_per_image):
    for j, (label, box) in enumerate(gt):
      boxes[i, j], labels[i, j], mask[i, j] = box, label, True
  return coco_detection.coco_ground_truth(
      list(range(1, n + 1)), np.array(sizes), boxes, labels, mask,
      category_ids=[1, 3], category_names=['cat', 'dog'])


def _evaluate(gt_boxes, detections, sizes, **kwargs):
  coco_gt = _ground_truth(gt_boxes, sizes)
  logits, boxes = _outputs(detections)
  results = coco_detection.detection_results(logits, boxes, np.array(sizes),
                                             list(range(1, len(sizes) + 1)),
                                             category_ids=[1, 3])
  return coco_detection.evaluate_detections(coco_gt, results, **kwargs)


def test_postprocess_matches_detr():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, NUM_CLASSES + 1)).astype(np.float32)
  boxes = np.array([[[0.5, 0.5, 0.2, 0.4]] * 3, [[0.25, 0.75, 0.5, 0.1]] * 3], np.float32)
  sizes = np.array([[200, 100], [50, 80]])  # (h, w)
  scores, labels, xywh = coco_detection.postprocess(logits, boxes, sizes)
  probs = softmax(logits.astype(np.float64), axis=-1)[..., :-1]
  np.testing.assert_allclose(scores, probs.max(-1), rtol=1e-6)
  np.testing.assert_array_equal(labels, probs.argmax(-1))
  # (cx - w/2) * W, (cy - h/2) * H, w * W, h * H.
  np.testing.assert_allclose(xywh[0, 0], [40.0, 60.0, 20.0, 80.0], rtol=1e-6)
  np.testing.assert_allclose(xywh[1, 2], [0.0, 35.0, 40.0, 5.0], rtol=1e-6, atol=1e-5)


def test_ground_truth_and_results_json(tmp_path):
  coco_gt = _ground_truth([[(1, (0.5, 0.5, 0.4, 0.2))]], [(100, 200)])
  (ann,) = coco_gt.dataset['annotations']
  assert ann['category_id'] == 3 and ann['image_id'] == 1
  np.testing.assert_allclose(ann['bbox'], [60.0, 40.0, 80.0, 20.0], rtol=1e-6)
  assert coco_gt.loadCats(3)[0]['name'] == 'dog'

  logits, boxes = _outputs([[(1, 8.0, (0.5, 0.5, 0.4, 0.2))]])
  results = coco_detection.detection_results(logits, boxes, np.array([(100, 200)]), [1],
                                             category_ids=[1, 3])
  assert len(results) == 4  # one record per query
  assert results[0]['category_id'] == 3
  path = tmp_path / 'detections.json'
  coco_detection.write_results(results, str(path))
  coco_dt = coco_gt.loadRes(str(path))
  assert len(coco_dt.getAnnIds(imgIds=[1])) == 4
  np.testing.assert_allclose(coco_dt.loadAnns(1)[0]['bbox'], [60.0, 40.0, 80.0, 20.0],
                             rtol=1e-6)


def test_perfect_predictions_give_ap_one():
  gt = [
      [(0, (0.3, 0.3, 0.4, 0.4)), (1, (0.7, 0.6, 0.5, 0.6))],
      [(1, (0.5, 0.5, 0.5, 0.5))],
      [],  # no ground truth; its only detections are low-score no-object queries
  ]
  detections = [[(c, 8.0, b) for c, b in image] for image in gt]
  stats = _evaluate(gt, detections, [(100, 100)] * 3)
  for name in ('AP', 'AP50', 'AP75', 'APm', 'AR100'):
    assert stats[name] == pytest.approx(1.0), name
  assert np.isnan(stats['APs'])  # no small ground-truth box: COCOeval's -1


def test_half_of_the_boxes_found():
  box_a, box_b = (0.3, 0.3, 0.3, 0.3), (0.7, 0.7, 0.3, 0.3)
  gt = [[(0, box_a), (0, box_b)], [(0, box_a), (0, box_b)]]
  detections = [[(0, 8.0, box_a)], [(0, 8.0, box_b)]]
  stats = _evaluate(gt, detections, [(100, 100)] * 2)
  # Precision 1 up to recall 0.5, nothing beyond: 51 of COCO's 101 recall points.
  for name in ('AP', 'AP50', 'AP75'):
    assert stats[name] == pytest.approx(51 / 101), name
  assert stats['AR100'] == pytest.approx(0.5)


def test_iou_thresholds():
  # GT [30, 30, 40, 40] px; the prediction is shifted 9 px: IoU = 31 / 49 = 0.633,
  # a true positive at IoU thresholds 0.50, 0.55, 0.60 only.
  gt = [[(0, (0.5, 0.5, 0.4, 0.4))]]
  detections = [[(0, 8.0, (0.59, 0.5, 0.4, 0.4))]]
  stats = _evaluate(gt, detections, [(100, 100)])
  assert stats['AP50'] == pytest.approx(1.0)
  assert stats['AP75'] == pytest.approx(0.0)
  assert stats['AP'] == pytest.approx(0.3)


def test_false_positive_ranked_first():
  # FP (far away) scored above the TP: precision 1/2 at recall 1 -> AP 0.5 everywhere.
  gt = [[(0, (0.3, 0.3, 0.3, 0.3))]]
  detections = [[(0, 9.0, (0.8, 0.8, 0.2, 0.2)), (0, 8.0, (0.3, 0.3, 0.3, 0.3))]]
  stats = _evaluate(gt, detections, [(100, 100)])
  assert stats['AP'] == pytest.approx(0.5)


def test_no_predictions_and_image_subsets(tmp_path):
  box = (0.3, 0.3, 0.3, 0.3)
  coco_gt = _ground_truth([[(0, box)], [(0, box)], []], [(100, 100)] * 3)
  assert coco_detection.evaluate_detections(coco_gt, [])['AP'] == pytest.approx(0.0)

  logits, boxes = _outputs([[(0, 8.0, box)]])
  results = coco_detection.detection_results(logits, boxes, np.array([(100, 100)]), [1],
                                             category_ids=[1, 3])
  # Image 2's box is missed when every image is scored, not when only image 1 is.
  assert coco_detection.evaluate_detections(coco_gt, results)['AP'] == pytest.approx(51 / 101)
  subset = coco_detection.evaluate_detections(coco_gt, results, image_ids=[1, 3])
  assert subset['AP'] == pytest.approx(1.0)

  # The same ground truth read back from an instances JSON gives the same numbers.
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps(coco_gt.dataset))
  from_file = coco_detection.load_coco_ground_truth(str(path))
  assert isinstance(from_file, COCO)
  assert coco_detection.evaluate_detections(from_file, results)['AP'] == pytest.approx(51 / 101)

  with pytest.raises(ValueError, match=r'Box labels must lie in \[0, 2\)'):
    coco_detection.coco_ground_truth([1], [(100, 100)], np.zeros((1, 1, 4)), [[2]], [[True]],
                                     category_ids=[1, 3])
  with pytest.raises(ValueError, match='not in the ground truth'):
    coco_detection.evaluate_detections(coco_gt, [dict(results[0], image_id=99)])
