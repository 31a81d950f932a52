"""The embedded corpus: determinism, formats, and text that matches the geometry."""

import collections
import filecmp
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from e2e_vlp.data import corpus

_DESC = r'(?:(?:small|large) )?(\w+) (\w+)'
_RELATION = re.compile(
    rf'(?:a|an|the) {_DESC} (?:is )?((?:to the )?(?:left|right) of|above|below) (?:a|an|the) '
    rf'{_DESC}')


def _load(root, rel):
  with open(os.path.join(root, rel)) as f:
    return json.load(f)


def _load_lines(root, rel):
  with open(os.path.join(root, rel)) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('corpus'))
  corpus.generate(out, num_train=40, num_val=6, seed=7, workers=1)
  return out


def _all_files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_same_seed_same_bytes_other_seed_differs(root, tmp_path):
  again, other = str(tmp_path / 'again'), str(tmp_path / 'other')
  corpus.generate(again, num_train=40, num_val=6, seed=7, workers=1)
  corpus.generate(other, num_train=40, num_val=6, seed=8, workers=1)
  files = _all_files(root)
  assert files == _all_files(again) == _all_files(other)
  _, mismatch, errors = filecmp.cmpfiles(root, again, files, shallow=False)
  assert not mismatch and not errors
  _, mismatch, _ = filecmp.cmpfiles(root, other, files, shallow=False)
  assert 'annotations/captions_train2014.json' in mismatch
  assert 'train2014/COCO_train2014_000000000001.jpg' in mismatch


def test_process_pool_gives_the_same_bytes(root, tmp_path):
  pooled = str(tmp_path / 'pooled')
  corpus.generate(pooled, num_train=40, num_val=6, seed=7, workers=2)
  files = _all_files(root)
  assert _all_files(pooled) == files
  _, mismatch, errors = filecmp.cmpfiles(root, pooled, files, shallow=False)
  assert not mismatch and not errors


def test_coco_files_are_consistent(root):
  caps = _load(root, 'annotations/captions_train2014.json')
  inst = _load(root, 'annotations/instances_train2014.json')
  assert [im['id'] for im in caps['images']] == list(range(1, 41))
  assert [c['name'] for c in inst['categories']] == list(corpus.SHAPES)
  per_image = collections.Counter(c['image_id'] for c in caps['annotations'])
  assert set(per_image.values()) == {5}
  for im in inst['images'][:10]:
    with Image.open(os.path.join(root, 'train2014', im['file_name'])) as image:
      assert image.format == 'JPEG' and image.size == (im['width'], im['height']) == (96, 96)
  for a in inst['annotations']:
    x, y, w, h = a['bbox']
    assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96 and 0 < a['area'] <= w * h
    colour, size = a['attribute_ids']
    assert colour < len(corpus.COLOURS) and corpus.ATTRIBUTES[size] in corpus.SIZES
    side = max(w, h)
    assert (14 * 0.7 <= side <= 21) if corpus.ATTRIBUTES[size] == 'small' else (26 <= side <= 37)
  boxes = collections.Counter(a['image_id'] for a in inst['annotations'])
  assert 1 <= min(boxes.values()) and max(boxes.values()) <= 5


def _objects(inst):
  by_image = collections.defaultdict(dict)
  for a in inst['annotations']:
    x, y, w, h = a['bbox']
    key = (corpus.COLOURS[a['attribute_ids'][0]], corpus.SHAPES[a['category_id'] - 1])
    by_image[a['image_id']][key] = (x + w / 2, y + h / 2)
  return by_image


def test_spatial_words_match_the_geometry(root):
  caps = _load(root, 'annotations/captions_train2014.json')
  objects = _objects(_load(root, 'annotations/instances_train2014.json'))
  checked = 0
  for c in caps['annotations']:
    m = _RELATION.search(c['caption'].lower())
    if not m:
      continue
    colour_a, shape_a, rel, colour_b, shape_b = m.groups()
    (ax, ay), (bx, by) = objects[c['image_id']][colour_a, shape_a], objects[c['image_id']][
        colour_b, shape_b]
    if 'left' in rel:
      assert ax < bx and abs(bx - ax) > abs(by - ay), c
    elif 'right' in rel:
      assert ax > bx and abs(bx - ax) > abs(by - ay), c
    elif rel == 'above':
      assert ay < by and abs(by - ay) > abs(bx - ax), c
    else:
      assert ay > by and abs(by - ay) > abs(bx - ax), c
    checked += 1
  assert checked >= 20


def test_objects_named_in_captions_exist(root):
  caps = _load(root, 'annotations/captions_train2014.json')
  objects = _objects(_load(root, 'annotations/instances_train2014.json'))
  pattern = re.compile(r'\b(' + '|'.join(corpus.COLOURS) + r') (' + '|'.join(corpus.SHAPES) + ')')
  for c in caps['annotations']:
    named = pattern.findall(c['caption'].lower())
    assert named and all(tuple(n) in objects[c['image_id']] for n in named), c


def test_vqa_answers_match_the_scene(root):
  questions = _load(root, 'annotations/v2_OpenEnded_mscoco_train2014_questions.json')
  answers = _load(root, 'annotations/v2_mscoco_train2014_annotations.json')['annotations']
  objects = _objects(_load(root, 'annotations/instances_train2014.json'))
  assert len(questions['questions']) == len(answers) == 80
  noisy = 0
  for q, a in zip(questions['questions'], answers):
    assert q['question_id'] == a['question_id'] and len(a['answers']) == 10
    objs = objects[q['image_id']]
    text = q['question']
    truth = None
    if text == 'how many objects are there?':
      truth = str(len(objs))
    elif m := re.fullmatch(r'is there an? (\w+) (\w+)\?', text):
      truth = 'yes' if (m[1], m[2]) in objs else 'no'
    elif m := re.fullmatch(r'what color is the (\w+)\?', text):
      truth = next(c for c, s in objs if s == m[1])
    if truth is not None:
      votes = collections.Counter(x['answer'] for x in a['answers'])
      assert votes[truth] >= 6 and a['multiple_choice_answer'] == truth, (text, votes)
    noisy += len({x['answer'] for x in a['answers']}) > 1
  assert noisy >= 10  # some questions have noisy answers, so soft scores vary


def test_nlvr2_is_balanced_and_points_at_images(root):
  lines = _load_lines(root, 'nlvr2/train.json')
  assert len(lines) == 4
  labels = collections.Counter(line['label'] for line in lines)
  assert labels == {'True': 2, 'False': 2}
  for line in lines:
    folder = os.path.join(root, 'nlvr2', 'images', 'train', line['directory'])
    for url in (line['left_url'], line['right_url']):
      with Image.open(os.path.join(folder, url)) as image:
        assert image.format == 'PNG'


def test_nlvr2_statements_are_true_when_labelled_true():
  rng = np.random.default_rng(0)
  for _ in range(50):
    left, _ = corpus.make_scene(rng, 96)
    right, _ = corpus.make_scene(rng, 96)
    for label in (True, False):
      sentence = corpus.nlvr2_statement(left, right, label, rng)
      if m := re.fullmatch(r'both images contain a (\w+)', sentence):
        name = m[1]
        has = lambda s: any(name in (corpus.SHAPES[o.shape], corpus.COLOURS[o.colour])
                            for o in s.objects)
        assert (has(left) and has(right)) == label, sentence
      elif sentence.startswith('there are more objects'):
        assert (len(left.objects) > len(right.objects)) == label, sentence


def test_karpathy_retrieval_splits(root):
  data = _load(root, 'dataset_embedded.json')
  splits = collections.Counter(im['split'] for im in data['images'])
  assert splits == {'train': 40, 'val': 3, 'test': 3}
  assert all(len(im['sentences']) == 5 and len(im['sentids']) == 5 for im in data['images'])
  first = data['images'][0]
  assert os.path.exists(os.path.join(root, first['filepath'], first['filename']))


def test_captions_differ_only_by_template_and_name_large_objects_first():
  """The template is a caption's only free choice (it alone bounds teacher-forced token
  accuracy, bench/caption_ceiling.py), and objects are named large ones first."""
  rng = np.random.default_rng(0)
  pattern = re.compile(r'\b(small|large) (' + '|'.join(corpus.COLOURS) + r') (' +
                       '|'.join(corpus.SHAPES) + ')')
  checked = 0
  for _ in range(200):
    scene = corpus.make_scene(rng, 96)[0]
    draws = {corpus.sample_caption(scene, rng).lower() for _ in range(60)}
    pairs = corpus._clear_pairs(scene.objects)  # pylint: disable=protected-access
    templates = 6 if len(scene.objects) == 1 or pairs else 3
    assert len(draws) <= templates, draws
    own = set(c.lower() for c in corpus.captions_for(scene, rng))
    assert len(own) == min(templates, 5) and own <= draws
    for caption in draws:
      named = pattern.findall(caption)
      assert named  # every object is named with its size, colour and shape
      if ' and ' in caption and ':' not in caption:  # the two-object templates
        first, second = named[:2]
        assert (first[0], second[0]) != ('small', 'large'), caption
        checked += 1
  assert checked > 100
