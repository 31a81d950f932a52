"""COCO box detection evaluation with the official pycocotools `COCOeval`.

Flow: model outputs -> `postprocess` (DETR's PostProcess) -> `detection_results` (the
COCO results JSON records) -> `evaluate_detections` against a ground-truth `COCO` object,
either the official instances JSON (`load_coco_ground_truth`: exact numbers, crowd
regions ignored as COCO does) or one built from the pipeline's normalised boxes
(`coco_ground_truth`; its areas are box areas, where COCO uses mask areas, so APs/m/l
can differ slightly from the official ones).

Label index `c` of the class head maps to COCO category id `category_ids[c]` (identity
when not given); the last logit is no-object.
"""

import contextlib
import io
import json
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Names of COCOeval.stats, in order (fractions in [0, 1]).
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
              'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def _maybe_quiet(quiet: bool):
  """Swallows pycocotools' progress prints when `quiet`."""
  return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def _cxcywh_to_xywh_pixels(boxes: np.ndarray, image_sizes: np.ndarray) -> np.ndarray:
  """`[N, K, 4]` normalised (cx, cy, w, h), `[N, 2]` (h, w) -> `[N, K, 4]` pixel (x, y, w, h)."""
  h, w = image_sizes[:, 0, None], image_sizes[:, 1, None]  # [N, 1]
  cx, cy, bw, bh = np.moveaxis(boxes, -1, 0)
  return np.stack([(cx - 0.5 * bw) * w, (cy - 0.5 * bh) * h, bw * w, bh * h], axis=-1)


def postprocess(class_logits: np.ndarray, boxes: np.ndarray,
                image_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """DETR's PostProcess: one scored detection per query.

  Softmax over classes and no-object, drop no-object, keep each query's top class.

  Args:
    class_logits: `[N, Q, C + 1]`, the last column is no-object.
    boxes: `[N, Q, 4]` normalised (cx, cy, w, h) relative to the real (unpadded) image.
    image_sizes: `[N, 2]` (height, width) in pixels of the frame the ground truth uses
      (the original image for COCO).

  Returns:
    scores `[N, Q]` f32, labels `[N, Q]` int (0..C-1), boxes `[N, Q, 4]` pixel (x, y, w, h).
  """
  class_logits = np.asarray(class_logits, dtype=np.float64)
  boxes = np.asarray(boxes, dtype=np.float64)
  image_sizes = np.asarray(image_sizes, dtype=np.float64)
  n, q, _ = class_logits.shape
  if boxes.shape != (n, q, 4) or image_sizes.shape != (n, 2):
    raise ValueError(f'Expected boxes [N, Q, 4] = [{n}, {q}, 4] and image_sizes [N, 2] = '
                     f'[{n}, 2] to match class_logits {class_logits.shape}; got '
                     f'{boxes.shape} and {image_sizes.shape}.')
  probs = _softmax(class_logits)[..., :-1]
  return (probs.max(axis=-1).astype(np.float32), probs.argmax(axis=-1),
          _cxcywh_to_xywh_pixels(boxes, image_sizes))


def _category_map(num_classes: int, category_ids: Sequence[int] | None) -> list[int]:
  if category_ids is None:
    return list(range(num_classes))
  if len(category_ids) != num_classes:
    raise ValueError(f'category_ids must give one COCO id per class ({num_classes}); got '
                     f'{len(category_ids)}.')
  return [int(c) for c in category_ids]


def detection_results(class_logits: np.ndarray, boxes: np.ndarray, image_sizes: np.ndarray,
                      image_ids: Sequence[int],
                      category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
  """COCO results records `{image_id, category_id, bbox: [x, y, w, h], score}`.

  Every query of every image gives one record, as in DETR's COCO evaluation (COCOeval
  keeps the 100 best per image).

  Args:
    class_logits: `[N, Q, C + 1]`, last = no-object.
    boxes: `[N, Q, 4]` normalised (cx, cy, w, h).
    image_sizes: `[N, 2]` (height, width) in ground-truth pixels.
    image_ids: `[N]` COCO image ids.
    category_ids: `[C]` COCO category id of each class index; identity when None.
  """
  scores, labels, xywh = postprocess(class_logits, boxes, image_sizes)
  if len(image_ids) != scores.shape[0]:
    raise ValueError(f'Got {len(image_ids)} image_ids for {scores.shape[0]} images.')
  cats = _category_map(np.shape(class_logits)[-1] - 1, category_ids)
  return [
      {'image_id': int(image_id), 'category_id': cats[int(label)],
       'bbox': [float(v) for v in box], 'score': float(score)}
      for image_id, image_scores, image_labels, image_boxes in zip(image_ids, scores, labels,
                                                                   xywh)
      for score, label, box in zip(image_scores, image_labels, image_boxes)
  ]


def write_results(results: list[dict[str, Any]], path: str) -> None:
  """Writes detection (or any COCO) results records as JSON (the test-dev upload format)."""
  with open(path, 'w') as f:
    json.dump(results, f)


def _coco_from_dict(dataset: dict[str, Any], quiet: bool) -> COCO:
  coco = COCO()
  coco.dataset = dataset
  with _maybe_quiet(quiet):
    coco.createIndex()
  return coco


def coco_ground_truth(image_ids: Sequence[int], image_sizes: np.ndarray, boxes: np.ndarray,
                      labels: np.ndarray, box_mask: np.ndarray,
                      category_ids: Sequence[int] | None = None,
                      category_names: Sequence[str] | None = None,
                      quiet: bool = True) -> COCO:
  """A pycocotools ground truth built from the pipeline's padded targets (no file needed).

  Args:
    image_ids: `[N]` image ids (unique).
    image_sizes: `[N, 2]` (height, width) in pixels.
    boxes: `[N, M, 4]` normalised (cx, cy, w, h).
    labels: `[N, M]` int class indices.
    box_mask: `[N, M]` bool, which rows are real boxes; an image may have none.
    category_ids: `[C]` COCO id of each class index; identity when None.
    category_names: `[C]` names; the ids as text when None. Without either, the classes
      are 0 .. the largest label present (classes without boxes never affect AP).
    quiet: hide pycocotools' prints.
  """
  image_sizes = np.asarray(image_sizes)
  labels = np.asarray(labels)
  box_mask = np.asarray(box_mask, dtype=bool)
  if len(set(int(i) for i in image_ids)) != len(image_ids):
    raise ValueError('coco_ground_truth needs unique image_ids; concatenate each image once.')
  if category_ids is not None:
    num_classes = len(category_ids)
  elif category_names is not None:
    num_classes = len(category_names)
  else:
    num_classes = int(labels[box_mask].max(initial=-1)) + 1
  cats = _category_map(num_classes, category_ids)
  names = [str(c) for c in cats] if category_names is None else list(category_names)
  if len(names) != len(cats):
    raise ValueError(f'Got {len(names)} category_names for {len(cats)} classes.')
  real_labels = labels[box_mask]
  if real_labels.size and (real_labels.min() < 0 or real_labels.max() >= len(cats)):
    raise ValueError(f'Box labels must lie in [0, {len(cats)}) (one per category); got '
                     f'[{real_labels.min()}, {real_labels.max()}].')
  xywh = _cxcywh_to_xywh_pixels(np.asarray(boxes, dtype=np.float64),
                                image_sizes.astype(np.float64))
  images, annotations = [], []
  for i, image_id in enumerate(image_ids):
    images.append({'id': int(image_id), 'height': int(image_sizes[i, 0]),
                   'width': int(image_sizes[i, 1])})
    for j in np.flatnonzero(box_mask[i]):
      x, y, w, h = (float(v) for v in xywh[i, j])
      annotations.append({'id': len(annotations) + 1, 'image_id': int(image_id),
                          'category_id': cats[int(labels[i, j])], 'bbox': [x, y, w, h],
                          'area': w * h, 'iscrowd': 0})
  categories = [{'id': c, 'name': n} for c, n in zip(cats, names)]
  return _coco_from_dict({'images': images, 'annotations': annotations,
                          'categories': categories}, quiet)


def load_coco_ground_truth(path: str, quiet: bool = True) -> COCO:
  """The ground truth from an official `instances_*.json`."""
  with _maybe_quiet(quiet):
    return COCO(path)


def _load_results(coco_gt: COCO, results: list[dict[str, Any]], quiet: bool) -> COCO:
  """`coco_gt.loadRes`, which fails on an empty list: no detections is a valid result."""
  unknown = {int(r['image_id']) for r in results} - set(coco_gt.getImgIds())
  if unknown:
    raise ValueError(f'{len(unknown)} result image ids are not in the ground truth (e.g. '
                     f'{sorted(unknown)[:5]}); build the ground truth from the same images.')
  if not results:
    return _coco_from_dict({'images': list(coco_gt.dataset['images']), 'annotations': [],
                            'categories': list(coco_gt.dataset['categories'])}, quiet)
  with _maybe_quiet(quiet):
    return coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place


def evaluate_detections(coco_gt: COCO, results: list[dict[str, Any]],
                        image_ids: Sequence[int] | None = None,
                        quiet: bool = True) -> dict[str, float]:
  """Runs COCOeval (bbox) and returns AP, AP50, AP75, APs/m/l and AR1/10/100, ARs/m/l.

  Args:
    coco_gt: the ground truth (`coco_ground_truth` or `load_coco_ground_truth`).
    results: `detection_results` records (may be empty).
    image_ids: the images to score; all ground-truth images when None. Pass the ids
      that were predicted when evaluating a subset of a split, or the missed images'
      boxes count as false negatives.
    quiet: hide pycocotools' prints (including the summary table).

  Returns:
    `STAT_NAMES` -> fraction in [0, 1]; NaN where COCOeval has no ground truth to score
    (it reports -1), e.g. APl when every box is small.
  """
  coco_dt = _load_results(coco_gt, results, quiet)
  evaluator = COCOeval(coco_gt, coco_dt, iouType='bbox')
  if image_ids is not None:
    evaluator.params.imgIds = sorted(int(i) for i in image_ids)
  with _maybe_quiet(quiet):
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(v) if v >= 0 else float('nan')
          for name, v in zip(STAT_NAMES, evaluator.stats)}
