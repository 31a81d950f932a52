"""The embedded corpus: generated shape scenes in the real published dataset formats.

It lets the whole system (builders, pipeline, pre-training, VQA, NLVR2, retrieval)
run end to end with no download. Each image shows 1-5 coloured shapes on a textured
background; captions, VQA questions and NLVR2 statements are computed from the scene
geometry, so a model that learns them has learned to see. Everything is written in the
on-disk formats of COCO 2014 (captions, instances), VQA v2, NLVR2 and Karpathy's
retrieval splits, so the same builders read it as they read the real data.

Documented extension of COCO instances: each annotation has `attribute_ids` (colour
and size) and the file has a top-level `attributes` list of `{id, name, type}`.

Layout under `out_dir`:
  annotations/captions_{train,val}2014.json, annotations/instances_{train,val}2014.json,
  annotations/v2_OpenEnded_mscoco_{train,val}2014_questions.json,
  annotations/v2_mscoco_{train,val}2014_annotations.json,
  {train,val}2014/COCO_{split}2014_{id:012d}.jpg,
  dataset_embedded.json (Karpathy format; splits train / val / test),
  nlvr2/{train,dev}.json, nlvr2/images/{train/<dir>,dev}/<split>-<n>-0-img{0,1}.png.

Generation is deterministic: every image draws from its own generator seeded by
(seed, split, index), so the same seed gives byte-identical files.
"""

import collections
import concurrent.futures
import dataclasses
import io
import json
import multiprocessing
import os
from typing import Any

import numpy as np
from PIL import Image

# The generator's version, part of the cache key (e2e_vlp/data/builders): bump it whenever
# the same seed would give other files. 2: one caption per template (`_caption`).
VERSION = 2
SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross', 'star')
PLURALS = ('circles', 'squares', 'triangles', 'diamonds', 'crosses', 'stars')
COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange')
_RGB = ((214, 39, 40), (40, 170, 60), (35, 85, 225), (240, 210, 30), (150, 60, 190),
        (250, 135, 20))
SIZES = ('small', 'large')
_SIDE_PX = ((14, 20), (28, 36))  # side or diameter range per size, at 96 px
BACKGROUNDS = ('noisy', 'striped', 'gradient')
# COCO-style ids: categories are 1-based; attribute ids are 0-5 colours, 6-7 sizes.
ATTRIBUTES = COLOURS + SIZES
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five')
_OPPOSITE = {'left of': 'right of', 'right of': 'left of', 'above': 'below', 'below': 'above'}
_CAPTIONS_PER_IMAGE = 5
_QUESTIONS_PER_IMAGE = 2
_MAX_OBJECTS = 5
_JPEG_QUALITY = 90
_MAX_CHUNK = 1000  # images per task of the process pool
_SPLIT_CODES = {'train': 0, 'val': 1, 'nlvr2_train': 2, 'nlvr2_dev': 3}


@dataclasses.dataclass(frozen=True)
class Obj:
  """One drawn shape; `box` is (x0, y0, x1, y1) in pixels, ends exclusive."""
  shape: int
  colour: int
  size: int
  box: tuple[int, int, int, int]
  area: int

  @property
  def center(self) -> tuple[float, float]:
    return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Obj, ...]
  background: int


def relation(a: Obj, b: Obj) -> str | None:
  """Where `a` is relative to `b` by box centres, or None when no axis clearly dominates."""
  (ax, ay), (bx, by) = a.center, b.center
  dx, dy = bx - ax, by - ay
  major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
  if major < 6 or major < 1.5 * minor:
    return None
  if abs(dx) > abs(dy):
    return 'left of' if dx > 0 else 'right of'
  return 'above' if dy > 0 else 'below'


def _shape_mask(shape: int, cx: float, cy: float, side: float,
                size: int) -> tuple[np.ndarray, int, int]:
  """Mask of a shape centred at (cx, cy) spanning about `side` px.

  Returns:
    ([h, w] bool mask of a window of the image, window's x0, window's y0).
  """
  r = side / 2
  x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
  x1, y1 = min(int(cx + r) + 2, size), min(int(cy + r) + 2, size)
  dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
  dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
  return _shape_window(SHAPES[shape], dx, dy, r), x0, y0


def _shape_window(name: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  if name == 'circle':
    return dx * dx + dy * dy <= r * r
  if name == 'square':
    return (np.abs(dx) <= r * 0.9) & (np.abs(dy) <= r * 0.9)
  if name == 'triangle':
    t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
  if name == 'diamond':
    return np.abs(dx) + np.abs(dy) <= r
  if name == 'cross':
    arm = r / 3
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
  # star: five points; the boundary radius falls linearly from r at a point to 0.45 r.
  angle = np.arctan2(dx, -dy) % (2 * np.pi / 5)
  t = np.abs(angle / (np.pi / 5) - 1)
  return np.hypot(dx, dy) <= r * (0.45 + 0.55 * t)


def _background(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
  """[size, size, 3] float32 low-saturation texture."""
  xx = np.arange(size, dtype=np.float32)[None, :]
  yy = np.arange(size, dtype=np.float32)[:, None]
  base = rng.uniform(75, 175)
  if BACKGROUNDS[kind] == 'noisy':
    coarse = rng.standard_normal((size // 8 + 1, size // 8 + 1), np.float32) * 14
    coarse = coarse.repeat(8, 0).repeat(8, 1)[:size, :size]
    value = base + coarse + rng.standard_normal((size, size), np.float32) * 12
  elif BACKGROUNDS[kind] == 'striped':
    period = rng.uniform(6, 14)
    theta = rng.choice([0, np.pi / 2, np.pi / 4, 3 * np.pi / 4])
    phase = (xx * np.cos(theta) + yy * np.sin(theta)) / (period / 2)
    value = base + np.where(np.floor(phase) % 2 == 0, 1, -1) * rng.uniform(15, 30)
  else:
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    value = base + (t - 0.5) * rng.uniform(50, 100)
  value = np.broadcast_to(value, (size, size))
  tint = rng.uniform(-12, 12, 3).astype(np.float32)
  return value[..., None] + tint


def make_scene(rng: np.random.Generator, size: int) -> tuple[Scene, np.ndarray]:
  """A random scene and its [size, size, 3] uint8 rendering."""
  background = int(rng.integers(len(BACKGROUNDS)))
  pixels = _background(rng, background, size)
  scale = size / 96
  num = int(rng.choice(np.arange(1, _MAX_OBJECTS + 1), p=[0.2, 0.25, 0.25, 0.15, 0.15]))
  pairs = rng.permutation(len(SHAPES) * len(COLOURS))  # (shape, colour) unique per image
  objects: list[Obj] = []
  for pair in pairs[:num]:
    shape, colour = divmod(int(pair), len(COLOURS))
    size_id = int(rng.integers(2))
    side = rng.uniform(*_SIDE_PX[size_id]) * scale
    for _ in range(30):
      cx, cy = rng.uniform(side / 2 + 1, size - side / 2 - 1, 2)
      mask, wx, wy = _shape_mask(shape, cx, cy, side, size)
      rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
      box = (wx + int(cols[0]), wy + int(rows[0]), wx + int(cols[-1]) + 1,
             wy + int(rows[-1]) + 1)
      if all(_overlap(box, o.box) <= 0.1 for o in objects):
        break
    else:
      continue
    rgb = np.array(_RGB[colour]) + rng.uniform(-12, 12, 3)
    pixels[wy:wy + mask.shape[0], wx:wx + mask.shape[1]][mask] = rgb
    objects.append(Obj(shape, colour, size_id, box, int(mask.sum())))
  image = np.clip(pixels + 0.5, 0, 255).astype(np.uint8)
  return Scene(tuple(objects), background), image


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
  """Intersection area over the smaller box's area."""
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  if w <= 0 or h <= 0:
    return 0.0
  smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
  return w * h / smaller


def _article(phrase: str) -> str:
  return ('an ' if phrase[0] in 'aeiou' else 'a ') + phrase


def _describe(o: Obj) -> str:
  return f'{SIZES[o.size]} {COLOURS[o.colour]} {SHAPES[o.shape]}'


def _mention_order(o: Obj) -> tuple[int, int, int]:
  """Large objects before small ones, then in the order of SHAPES and COLOURS.

  A fixed convention, so that a scene has one caption per template: teacher-forced token
  accuracy then measures how well a model sees, not how well it guesses a describer's
  whims. A horizontal flip (augmentation) keeps the order; a position-based one would not.
  """
  return -o.size, o.shape, o.colour


def _clear_pairs(objects: tuple[Obj, ...]) -> list[tuple[Obj, Obj, str]]:
  return [(a, b, rel) for a in objects for b in objects
          if a is not b and (rel := relation(a, b)) is not None]


def _caption(scene: Scene, template: int) -> str:
  """The caption of `scene` in `template` (0 <= template < _num_templates(scene)).

  The template is the only free choice: the words for each object, which objects are
  named and in what order follow from the scene (`_mention_order`). Sentences end with a
  period, phrases do not.
  """
  objs = tuple(sorted(scene.objects, key=_mention_order))
  bg = f'{_article(BACKGROUNDS[scene.background])} background'
  if len(objs) == 1:
    d = _describe(objs[0])
    return (f'{_article(d)} on {bg}', _article(d), f'there is one {d}.',
            f'a picture of {_article(d)}', f'one {d} on {bg}', f'a single {d}')[template]
  if template == 0:
    listed = [_article(_describe(o)) for o in objs]
    return f'{NUMBER_WORDS[len(objs)]} objects: ' + ', '.join(listed[:-1]) + ' and ' + listed[-1]
  if template in (1, 2):
    a, b = _article(_describe(objs[0])), _article(_describe(objs[1]))
    if template == 1:
      return f'{a} and {b} on {bg}'
    return f'{NUMBER_WORDS[len(objs)]} shapes including {a} and {b}'
  a, b, rel = _clear_pairs(objs)[0]
  da, db = _article(_describe(a)), _article(_describe(b))
  if template == 3:
    return f'{da} {rel} {db}'
  if template == 4:
    return f'there is {da} {"to the " + rel if "of" in rel else rel} {db}.'
  return f'the {_describe(a)} is {rel} the {_describe(b)}.'


def _num_templates(scene: Scene) -> int:
  """Six, or three for several objects of which no two are in a clear relation."""
  return 6 if len(scene.objects) == 1 or _clear_pairs(scene.objects) else 3


def _style(text: str, rng: np.random.Generator) -> str:
  """Real captions vary in case; so do these (the tokenizer lower-cases)."""
  if rng.random() < 0.5:
    text = text[0].upper() + text[1:]
  return text


def sample_caption(scene: Scene, rng: np.random.Generator) -> str:
  """One draw from the caption distribution of `scene`: a template, uniformly."""
  return _style(_caption(scene, int(rng.integers(_num_templates(scene)))), rng)


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
  """Five captions in distinct templates (repeats only when the scene has fewer than five)."""
  num = _num_templates(scene)
  templates = rng.permutation(num)[:_CAPTIONS_PER_IMAGE]
  out = [_caption(scene, int(t)) for t in templates]
  distinct = list(out)
  while len(out) < _CAPTIONS_PER_IMAGE:
    out.append(distinct[len(out) % len(distinct)])
  return [_style(c, rng) for c in out]


def _questions_for(scene: Scene, rng: np.random.Generator) -> list[dict[str, Any]]:
  """VQA questions as dicts: question, answer, question_type, answer_type, wrong (answers)."""
  objs = scene.objects
  out = []
  shape_counts = collections.Counter(o.shape for o in objs)
  pairs = _clear_pairs(objs)
  for _ in range(_QUESTIONS_PER_IMAGE):
    kinds = ['count', 'exist', 'colour'] + ['relation'] * bool(pairs)
    kind = kinds[rng.integers(len(kinds))]
    if kind == 'count':
      variant = rng.integers(3)
      if variant == 0:
        shape = int(rng.integers(len(SHAPES)))
        q, n = f'how many {PLURALS[shape]} are there?', shape_counts[shape]
      elif variant == 1:
        colour = int(rng.integers(len(COLOURS)))
        n = sum(o.colour == colour for o in objs)
        q = f'how many {COLOURS[colour]} objects are there?'
      else:
        q, n = 'how many objects are there?', len(objs)
      out.append(dict(question=q, answer=str(n), question_type='how many', answer_type='number',
                      wrong=[str(max(n - 1, 0)), str(n + 1)]))
    elif kind == 'exist':
      if rng.random() < 0.5 and objs:
        o = objs[rng.integers(len(objs))]
        shape, colour, answer = o.shape, o.colour, 'yes'
      else:
        present = {(o.shape, o.colour) for o in objs}
        absent = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))
                  if (s, c) not in present]
        shape, colour = absent[rng.integers(len(absent))]
        answer = 'no'
      q = f'is there {_article(COLOURS[colour] + " " + SHAPES[shape])}?'
      out.append(dict(question=q, answer=answer, question_type='is there a',
                      answer_type='yes/no', wrong=['no' if answer == 'yes' else 'yes']))
    elif kind == 'colour':
      unique = [o for o in objs if shape_counts[o.shape] == 1]
      if unique:
        o = unique[rng.integers(len(unique))]
        out.append(dict(question=f'what color is the {SHAPES[o.shape]}?',
                        answer=COLOURS[o.colour], question_type='what color is the',
                        answer_type='other',
                        wrong=[c for i, c in enumerate(COLOURS) if i != o.colour]))
      else:  # every shape repeats: name the colour and ask about the size
        o = objs[rng.integers(len(objs))]
        out.append(dict(question=f'what size is the {COLOURS[o.colour]} {SHAPES[o.shape]}?',
                        answer=SIZES[o.size], question_type='what size is the',
                        answer_type='other', wrong=[SIZES[1 - o.size]]))
    else:
      a, b, rel = pairs[rng.integers(len(pairs))]
      answer = 'yes' if rng.random() < 0.5 else 'no'
      asked = rel if answer == 'yes' else _OPPOSITE[rel]
      q = (f'is the {COLOURS[a.colour]} {SHAPES[a.shape]} {asked} '
           f'the {COLOURS[b.colour]} {SHAPES[b.shape]}?')
      out.append(dict(question=q, answer=answer, question_type='is the', answer_type='yes/no',
                      wrong=['no' if answer == 'yes' else 'yes']))
  return out


def _human_answers(q: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
  """Ten answers: at least six correct, up to four noisy ones so soft scores vary."""
  noisy = np.zeros(10, bool)
  noisy[rng.permutation(10)[:rng.choice(5, p=[0.4, 0.25, 0.15, 0.1, 0.1])]] = True
  wrong = rng.integers(len(q['wrong']), size=10)
  unsure = rng.random(10) < 0.5
  return [{'answer': q['wrong'][w] if n else q['answer'],
           'answer_confidence': ('maybe' if u else 'no') if n else 'yes', 'answer_id': k + 1}
          for k, (n, w, u) in enumerate(zip(noisy, wrong, unsure))]


def _jpeg(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='JPEG', quality=_JPEG_QUALITY)
  return out.getvalue()


def _png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='PNG')
  return out.getvalue()


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def nlvr2_statement(left: Scene, right: Scene, label: bool,
                     rng: np.random.Generator) -> str:
  """A statement about the pair whose truth value is `label`."""
  sides = {'left': left, 'right': right}
  candidates: list[tuple[str, bool]] = []
  for side, scene in sides.items():
    for s in range(len(SHAPES)):
      n = sum(o.shape == s for o in scene.objects)
      candidates.append((f'the {side} image contains a {SHAPES[s]}', n > 0))
      k = int(rng.integers(1, 4))
      noun = SHAPES[s] if k == 1 else PLURALS[s]
      candidates.append((f'the {side} image contains exactly {NUMBER_WORDS[k]} {noun}', n == k))
    o_shape, o_colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
    present = any(o.shape == o_shape and o.colour == o_colour for o in scene.objects)
    candidates.append(
        (f'there is {_article(COLOURS[o_colour] + " " + SHAPES[o_shape])} in the {side} image',
         present))
  for s in range(len(SHAPES)):
    both = all(any(o.shape == s for o in sc.objects) for sc in sides.values())
    candidates.append((f'both images contain a {SHAPES[s]}', both))
  for c in range(len(COLOURS)):
    both = all(any(o.colour == c for o in sc.objects) for sc in sides.values())
    candidates.append((f'both images contain a {COLOURS[c]} object', both))
  nl, nr = len(left.objects), len(right.objects)
  candidates.append(('there are more objects in the left image than in the right image', nl > nr))
  candidates.append(('there are fewer objects in the left image than in the right image', nl < nr))
  total = nl + nr + int(rng.integers(-1, 2))
  if 1 <= total <= 2 * _MAX_OBJECTS:
    candidates.append((f'there are exactly {total} objects in total', total == nl + nr))
  matching = [text for text, truth in candidates if truth == label]
  return matching[rng.integers(len(matching))]


def _write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _write_json(path: str, obj: Any, lines: bool = False) -> None:
  if lines:
    text = ''.join(json.dumps(o, separators=(',', ':')) + '\n' for o in obj)
  else:
    text = json.dumps(obj, separators=(',', ':'))
  _write(path, text.encode('utf-8'))


def _coco_file_name(split: str, image_id: int) -> str:
  return f'COCO_{split}2014_{image_id:012d}.jpg'


def _coco_chunk(out_dir: str, split: str, first_id: int, start: int, stop: int, seed: int,
                image_size: int) -> list[dict[str, Any]]:
  """Writes images [start, stop) of one COCO-style split; returns per-image records."""
  records = []
  for index in range(start, stop):
    rng = _rng(seed, split, index)
    scene, image = make_scene(rng, image_size)
    image_id = first_id + index
    name = _coco_file_name(split, image_id)
    _write(os.path.join(out_dir, f'{split}2014', name), _jpeg(image))
    questions = [dict(q, answers=_human_answers(q, rng)) for q in _questions_for(scene, rng)]
    records.append(dict(id=image_id, file_name=name, scene=scene,
                        captions=captions_for(scene, rng), questions=questions))
  return records


def _coco_json(split: str, records: list[dict[str, Any]], size: int, out_dir: str) -> None:
  info = {'description': 'e2e-vlp embedded shapes corpus', 'version': '1.0', 'year': 2014}
  images = [{'id': r['id'], 'file_name': r['file_name'], 'height': size, 'width': size,
             'license': 0} for r in records]
  captions, instances, questions, annotations = [], [], [], []
  for r in records:
    for c in r['captions']:
      captions.append({'id': len(captions) + 1, 'image_id': r['id'], 'caption': c})
    for o in r['scene'].objects:
      x0, y0, x1, y1 = o.box
      instances.append({
          'id': len(instances) + 1, 'image_id': r['id'], 'category_id': o.shape + 1,
          'bbox': [x0, y0, x1 - x0, y1 - y0], 'area': o.area, 'iscrowd': 0,
          'segmentation': [[x0, y0, x1, y0, x1, y1, x0, y1]],
          'attribute_ids': [o.colour, len(COLOURS) + o.size]})
    for k, q in enumerate(r['questions']):
      qid = r['id'] * 1000 + k
      questions.append({'image_id': r['id'], 'question': q['question'], 'question_id': qid})
      annotations.append({
          'question_type': q['question_type'], 'multiple_choice_answer': q['answer'],
          'answers': q['answers'], 'image_id': r['id'], 'answer_type': q['answer_type'],
          'question_id': qid})
  ann = os.path.join(out_dir, 'annotations')
  _write_json(os.path.join(ann, f'captions_{split}2014.json'), {
      'info': info, 'licenses': [], 'images': images, 'annotations': captions})
  _write_json(os.path.join(ann, f'instances_{split}2014.json'), {
      'info': info, 'licenses': [], 'images': images, 'annotations': instances,
      'categories': [{'id': i + 1, 'name': s, 'supercategory': 'shape'}
                     for i, s in enumerate(SHAPES)],
      'attributes': [{'id': i, 'name': a, 'type': 'colour' if i < len(COLOURS) else 'size'}
                     for i, a in enumerate(ATTRIBUTES)]})
  _write_json(os.path.join(ann, f'v2_OpenEnded_mscoco_{split}2014_questions.json'), {
      'info': info, 'task_type': 'Open-Ended', 'data_type': 'mscoco', 'license': {},
      'data_subtype': f'{split}2014', 'questions': questions})
  _write_json(os.path.join(ann, f'v2_mscoco_{split}2014_annotations.json'), {
      'info': info, 'license': {}, 'data_subtype': f'{split}2014', 'annotations': annotations})


def _karpathy_json(train: list[dict[str, Any]], val: list[dict[str, Any]], out_dir: str) -> None:
  """Karpathy-style retrieval splits: train images; val images halved into val / test."""
  images, sentid = [], 0
  half = (len(val) + 1) // 2
  for split, records in (('train', train), ('val', val[:half]), ('test', val[half:])):
    for r in records:
      sentences = []
      for c in r['captions']:
        tokens = ''.join(ch if ch.isalnum() or ch == ' ' else ' ' for ch in c.lower()).split()
        sentences.append({'tokens': tokens, 'raw': c, 'imgid': len(images), 'sentid': sentid})
        sentid += 1
      images.append({
          'filepath': 'train2014' if split == 'train' else 'val2014', 'filename': r['file_name'],
          'imgid': len(images), 'split': split, 'cocoid': r['id'],
          'sentids': [s['sentid'] for s in sentences], 'sentences': sentences})
  _write_json(os.path.join(out_dir, 'dataset_embedded.json'),
              {'images': images, 'dataset': 'embedded'})


def _nlvr2_chunk(out_dir: str, split: str, start: int, stop: int, seed: int,
                 image_size: int) -> list[dict[str, Any]]:
  """Writes NLVR2 pairs [start, stop) of a split; returns their jsonl lines."""
  lines = []
  for index in range(start, stop):
    rng = _rng(seed, f'nlvr2_{split}', index)
    (left, left_px), (right, right_px) = make_scene(rng, image_size), make_scene(rng, image_size)
    label = index % 2 == 0  # balanced
    sentence = nlvr2_statement(left, right, label, rng)
    directory = str(index % 100) if split == 'train' else ''
    stem = f'{split}-{index}-0'
    folder = os.path.join(out_dir, 'nlvr2', 'images', split, directory)
    _write(os.path.join(folder, f'{stem}-img0.png'), _png(left_px))
    _write(os.path.join(folder, f'{stem}-img1.png'), _png(right_px))
    line = {'identifier': f'{stem}-0', 'sentence': _style(sentence, rng),
            'label': 'True' if label else 'False', 'left_url': f'{stem}-img0.png',
            'right_url': f'{stem}-img1.png', 'synset': 'shapes', 'query': 'shapes'}
    if directory:
      line['directory'] = directory
    lines.append(line)
  return lines


def _run_chunks(fn, num: int, args_of, workers: int) -> list[Any]:
  """Runs fn over [0, num) in chunks, in `workers` processes; results in index order."""
  chunk = max(1, min(_MAX_CHUNK, -(-num // (4 * max(workers, 1)))))
  bounds = [(a, min(a + chunk, num)) for a in range(0, num, chunk)]
  if workers <= 1:
    return [r for a, b in bounds for r in fn(*args_of(a, b))]
  # spawn: forking a process that already runs TensorFlow or JAX threads is unsafe.
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn')) as pool:
    futures = [pool.submit(fn, *args_of(a, b)) for a, b in bounds]
    return [r for f in futures for r in f.result()]


def generate(out_dir: str | os.PathLike, *, num_train: int, num_val: int, seed: int,
             image_size: int = 96, num_nlvr2_train: int | None = None,
             num_nlvr2_dev: int | None = None, workers: int = 1) -> None:
  """Writes the corpus into `out_dir` (see the module docstring for the layout).

  NLVR2 pair counts default to num_train // 10 and num_val // 2 (at least 2 each).
  The output does not depend on `workers`. Measured on the 2-vCPU development machine
  (shared with other jobs), 2 workers were slower than 1 (20,500 images: 128 s vs 69 s),
  so the pool is for hosts with more cores. With workers > 1 the caller's main module
  must be import-safe (`if __name__ == '__main__':`), as for any spawned process.
  """
  if num_train < 1 or num_val < 2:
    raise ValueError(f'Need num_train >= 1 and num_val >= 2, got {num_train}, {num_val}.')
  out_dir = os.fspath(out_dir)
  splits = {}
  for split, first_id, num in (('train', 1, num_train), ('val', num_train + 1, num_val)):
    splits[split] = _run_chunks(
        _coco_chunk, num,
        lambda a, b, split=split, first_id=first_id: (
            out_dir, split, first_id, a, b, seed, image_size), workers)
    _coco_json(split, splits[split], image_size, out_dir)
  _karpathy_json(splits['train'], splits['val'], out_dir)
  nlvr2_train = max(2, num_train // 10) if num_nlvr2_train is None else num_nlvr2_train
  nlvr2_dev = max(2, num_val // 2) if num_nlvr2_dev is None else num_nlvr2_dev
  for split, num in (('train', nlvr2_train), ('dev', nlvr2_dev)):
    lines = _run_chunks(_nlvr2_chunk, num,
                        lambda a, b, split=split: (out_dir, split, a, b, seed, image_size),
                        workers)
    _write_json(os.path.join(out_dir, 'nlvr2', f'{split}.json'), lines, lines=True)
