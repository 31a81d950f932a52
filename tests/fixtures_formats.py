"""Writers of tiny datasets in the real published on-disk formats, for tests.

They encode what the public releases look like (file names, folder layout, JSON keys),
independently of the builders that read them. Images are small random arrays.
"""

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image


def write_image(path: str, width: int = 40, height: int = 30, *, mode: str = 'RGB',
                fmt: str = 'JPEG', seed: int = 0) -> np.ndarray:
  """Writes a smooth random image; returns its RGB pixels [height, width, 3]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
  weights = rng.uniform(-120, 120, (3, 2))
  base = rng.uniform(60, 190, 3)
  rgb = (base + weights[:, 0] * yy[..., None] + weights[:, 1] * xx[..., None])
  rgb = np.clip(rgb, 0, 255).astype(np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(rgb)
  if mode != 'RGB':
    image = image.convert(mode)
  image.save(path, format=fmt)
  return rgb


def write_truncated_jpeg(path: str, width: int = 40, height: int = 30) -> None:
  """A JPEG cut in half, as a failed download leaves it."""
  write_image(path, width, height)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def _dump(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def coco_image(image_id: int, split: str, width: int = 40, height: int = 30,
               year: str = '2014') -> dict[str, Any]:
  return {'id': image_id, 'file_name': f'COCO_{split}{year}_{image_id:012d}.jpg',
          'height': height, 'width': width, 'license': 1}


def write_coco_captions(root: str, split: str, images: Sequence[dict[str, Any]],
                        captions: Sequence[tuple[int, Any]], year: str = '2014') -> None:
  """annotations/captions_{split}{year}.json; captions are (image_id, caption)."""
  _dump(os.path.join(root, 'annotations', f'captions_{split}{year}.json'), {
      'info': {}, 'licenses': [], 'images': list(images),
      'annotations': [{'id': i + 1, 'image_id': image_id, 'caption': c}
                      for i, (image_id, c) in enumerate(captions)]})


def write_coco_instances(root: str, split: str, images: Sequence[dict[str, Any]],
                         boxes: Sequence[dict[str, Any]], categories: Sequence[tuple[int, str]],
                         attributes: Sequence[tuple[int, str]] | None = None,
                         year: str = '2014') -> None:
  """annotations/instances_{split}{year}.json.

  boxes: dicts with image_id, category_id, bbox [x, y, w, h] (pixels) and optional
  iscrowd / attribute_ids (the embedded corpus' extension).
  """
  annotations = []
  for i, b in enumerate(boxes):
    x, y, w, h = b['bbox']
    ann = {'id': i + 1, 'image_id': b['image_id'], 'category_id': b['category_id'],
           'bbox': b['bbox'], 'area': w * h, 'iscrowd': b.get('iscrowd', 0),
           'segmentation': [[x, y, x + w, y, x + w, y + h, x, y + h]]}
    if 'attribute_ids' in b:
      ann['attribute_ids'] = b['attribute_ids']
    annotations.append(ann)
  data = {'info': {}, 'licenses': [], 'images': list(images), 'annotations': annotations,
          'categories': [{'id': i, 'name': n, 'supercategory': 'thing'} for i, n in categories]}
  if attributes is not None:
    data['attributes'] = [{'id': i, 'name': n} for i, n in attributes]
  _dump(os.path.join(root, 'annotations', f'instances_{split}{year}.json'), data)


def write_vqa(root: str, split: str, questions: Sequence[dict[str, Any]],
              year: str = '2014') -> None:
  """VQA v2 question and annotation files.

  questions: dicts with question_id, image_id, question, answers (ten strings) and
  optional multiple_choice_answer / question_type / answer_type.
  """
  _dump(os.path.join(root, f'v2_OpenEnded_mscoco_{split}{year}_questions.json'), {
      'info': {}, 'task_type': 'Open-Ended', 'data_type': 'mscoco', 'license': {},
      'data_subtype': f'{split}{year}',
      'questions': [{'image_id': q['image_id'], 'question': q['question'],
                     'question_id': q['question_id']} for q in questions]})
  annotations = []
  for q in questions:
    answers = q['answers']
    annotations.append({
        'question_type': q.get('question_type', 'what'),
        'multiple_choice_answer': q.get('multiple_choice_answer', answers[0]),
        'answers': [{'answer': a, 'answer_confidence': 'yes', 'answer_id': k + 1}
                    for k, a in enumerate(answers)],
        'image_id': q['image_id'], 'answer_type': q.get('answer_type', 'other'),
        'question_id': q['question_id']})
  _dump(os.path.join(root, f'v2_mscoco_{split}{year}_annotations.json'), {
      'info': {}, 'license': {}, 'data_subtype': f'{split}{year}', 'annotations': annotations})


def write_nlvr2(root: str, stem: str, items: Sequence[dict[str, Any]]) -> None:
  """{stem}.json in JSON lines (identifier, sentence, label, optional directory)."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f'{stem}.json'), 'w') as f:
    for item in items:
      base = item['identifier'].rsplit('-', 1)[0]
      line = {'validation': {}, 'sentence': item['sentence'], 'left_url': f'{base}-img0.png',
              'writer': 'w', 'label': item['label'], 'right_url': f'{base}-img1.png',
              'synset': 'n', 'query': 'q', 'identifier': item['identifier'],
              'extra_validations': {}}
      if 'directory' in item:
        line['directory'] = item['directory']
      f.write(json.dumps(line) + '\n')


def nlvr2_image_path(root: str, stem: str, identifier: str, k: int,
                     directory: str | None = None) -> str:
  base = identifier.rsplit('-', 1)[0]
  parts = [root, 'images', stem] + ([directory] if directory else []) + [f'{base}-img{k}.png']
  return os.path.join(*parts)


def write_karpathy(root: str, name: str, images: Sequence[dict[str, Any]]) -> None:
  """Karpathy's dataset_*.json; images: dicts with filename, split, captions (+ extras).

  `tokens` are his lower-cased, punctuation-free words; `dataset` is the name in
  dataset_<name>.json (flickr30k, coco).
  """
  out, sentid = [], 0
  for imgid, im in enumerate(images):
    sentences = []
    for c in im['captions']:
      tokens = ''.join(ch if ch.isalnum() else ' ' for ch in str(c).lower()).split()
      sentences.append({'tokens': tokens, 'raw': c, 'imgid': imgid, 'sentid': sentid})
      sentid += 1
    entry = {'sentids': [s['sentid'] for s in sentences], 'imgid': imgid,
             'sentences': sentences, 'split': im['split'], 'filename': im['filename']}
    entry.update({k: v for k, v in im.items() if k not in ('captions', 'split', 'filename')})
    out.append(entry)
  dataset = os.path.splitext(name)[0].removeprefix('dataset_')
  _dump(os.path.join(root, name), {'images': out, 'dataset': dataset})


def karpathy_coco_image(cocoid: int, split: str, captions: Sequence[Any]) -> dict[str, Any]:
  """An entry of dataset_coco.json: train images from train2014, the rest from val2014."""
  folder = 'train2014' if split == 'train' else 'val2014'  # restval / val / test: COCO val
  return {'filepath': folder, 'filename': f'COCO_{folder}_{cocoid:012d}.jpg', 'cocoid': cocoid,
          'split': split, 'captions': list(captions)}


def write_visual_genome(root: str, images: Sequence[dict[str, Any]],
                        objects: dict[int, Sequence[dict[str, Any]]]) -> None:
  """image_data.json, objects.json and attributes.json (v1.4 layout).

  images: dicts with image_id, width, height (url points into VG_100K/).
  objects: image_id -> dicts with object_id, x, y, w, h, names and optional attributes.
  """
  _dump(os.path.join(root, 'image_data.json'), [
      {'image_id': im['image_id'], 'width': im['width'], 'height': im['height'],
       'url': f'https://cs.stanford.edu/people/rak248/VG_100K/{im["image_id"]}.jpg',
       'coco_id': None, 'flickr_id': None} for im in images])
  _dump(os.path.join(root, 'objects.json'), [
      {'image_id': image_id, 'objects': [
          {k: v for k, v in o.items() if k != 'attributes'} | {'synsets': []} for o in objs]}
      for image_id, objs in objects.items()])
  _dump(os.path.join(root, 'attributes.json'), [
      {'image_id': image_id, 'attributes': [
          {k: v for k, v in o.items()} | {'synsets': []} for o in objs if 'attributes' in o]}
      for image_id, objs in objects.items()])
