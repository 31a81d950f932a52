"""The TFDS builders on tiny fixtures written in the published formats."""

import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_formats as ff
from configs import caption as caption_config
from configs import pretrain
from e2e_vlp.data import builders, corpus, finetune_pipelines, prepare, records
from e2e_vlp.data.builders import visual_genome, vqa_v2

tfds.disable_progress_bar()


def _examples(builder, split, key):
  """Split examples as numpy, by `key` (bytes decoded)."""
  out = {}
  for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    k = ex[key]
    out[k.decode() if isinstance(k, bytes) else int(k)] = ex
  return out


def _json(root, rel):
  with open(os.path.join(root, rel)) as f:
    return json.load(f)


@pytest.fixture
def coco_dir(tmp_path):
  """COCO 2014 with one clean image and one of each kind of bad input."""
  root = str(tmp_path / 'coco')
  images = [ff.coco_image(i, 'train') for i in range(1, 8)]
  images[1]['width'], images[1]['height'] = 20, 10  # image 2 is 20x10
  img = lambda i: os.path.join(root, 'train2014', images[i - 1]['file_name'])
  ff.write_image(img(1), 40, 30)
  ff.write_image(img(2), 20, 10, mode='L')  # grayscale JPEG
  ff.write_image(img(3), 40, 30, mode='CMYK')  # CMYK JPEG
  ff.write_image(img(4), 40, 30, mode='RGBA', fmt='PNG')  # a PNG named .jpg
  ff.write_truncated_jpeg(img(5))
  # image 6 is missing; image 7 exists but has only a blank caption
  ff.write_image(img(7), 40, 30)
  captions = [(1, 'A red dog.'), (1, '  '), (1, 'Two dogs\n'), (2, 'gray'), (3, 'cmyk'),
              (4, 'png'), (5, 'truncated'), (6, 'missing'), (7, ' '), (99, 'no such image')]
  ff.write_coco_captions(root, 'train', images, captions)
  boxes = [
      dict(image_id=1, category_id=18, bbox=[4, 3, 10, 6], attribute_ids=[7, 3]),
      dict(image_id=1, category_id=1, bbox=[35, 25, 10, 10]),  # leaves the image: clipped
      dict(image_id=1, category_id=1, bbox=[50, 50, 5, 5]),  # fully outside: dropped
      dict(image_id=1, category_id=1, bbox=[5, 5, 0, 4]),  # zero width: dropped
      dict(image_id=1, category_id=42, bbox=[1, 1, 2, 2]),  # unknown category: dropped
      dict(image_id=1, category_id=1, bbox=[1, 1, 5, 5], iscrowd=1),  # crowd: dropped
      dict(image_id=2, category_id=1, bbox=[0, 0, 20, 10]),
  ]
  ff.write_coco_instances(root, 'train', images, boxes, categories=[(18, 'dog'), (1, 'person')],
                          attributes=[(3, 'red'), (7, 'big')])
  return root


def test_coco_instances_boxes_labels_and_bad_input(coco_dir, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  builder = builders.build('coco_instances', coco_dir, tmp_path / 'tfds')
  # Categories sorted by id: person (1) -> 0, dog (18) -> 1; attributes red (3), big (7).
  assert builders.load_class_names(builder) == ['person', 'dog']
  assert builders.load_attribute_names(builder) == ['red', 'big']
  ex = _examples(builder, 'train', 'image/id')
  assert sorted(ex) == [1, 2, 3, 4, 7]  # truncated (5) and missing (6) skipped
  objs = ex[1]['objects']
  # COCO [x, y, w, h] = [4, 3, 10, 6] in a 40x30 image -> [ymin, xmin, ymax, xmax] by hand.
  np.testing.assert_allclose(objs['bbox'][0], [3 / 30, 4 / 40, 9 / 30, 14 / 40], rtol=1e-6)
  np.testing.assert_allclose(objs['bbox'][1], [25 / 30, 35 / 40, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(objs['label'], [1, 0])
  np.testing.assert_array_equal(objs['attributes'], [[1, 0, -1, -1], [-1, -1, -1, -1]])
  assert len(ex[7]['objects']['bbox']) == 0  # images without boxes are kept
  for i, (w, h) in {2: (20, 10), 3: (40, 30), 4: (40, 30)}.items():
    assert ex[i]['image'].shape == (h, w, 3)  # grayscale / CMYK / PNG decoded to RGB
  assert ex[1]['captions'].size == 0
  counts = builder.info.metadata['bad_input']['train']
  assert counts == {'converted_image': 3, 'corrupt_image': 1, 'missing_image': 1,
                    'clipped_box': 1, 'zero_area_box': 2, 'unknown_category': 1,
                    'crowd_box': 1}
  assert any('coco_instances/train' in r.getMessage() and 'corrupt_image=1' in r.getMessage()
             for r in caplog.records)


def test_coco_captions_and_reload_without_builder_code(coco_dir, tmp_path):
  builder = builders.build('coco_captions', coco_dir, tmp_path / 'tfds')
  ex = _examples(builder, 'train', 'image/id')
  assert sorted(ex) == [1, 2, 3, 4]  # 7 has only a blank caption
  assert [c.decode() for c in ex[1]['captions']] == ['A red dog.', 'Two dogs']
  assert ex[1]['image/filename'].decode() == 'COCO_train2014_000000000001.jpg'
  # An RGB JPEG is stored byte for byte.
  raw = builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  stored = {int(e['image/id']): e['image'] for e in tfds.as_numpy(raw)}
  with open(os.path.join(coco_dir, 'train2014', 'COCO_train2014_000000000001.jpg'), 'rb') as f:
    assert stored[1] == f.read()
  assert builder.info.metadata['bad_input']['train'] == {
      'empty_caption': 2, 'unknown_image': 1, 'no_captions': 1, 'converted_image': 3,
      'corrupt_image': 1, 'missing_image': 1}
  # A process without the builder code reads it back, metadata included.
  read_only = tfds.builder_from_directory(builder.data_dir)
  assert read_only.info.splits['train'].num_examples == 4
  assert builders.load_class_names(builder.data_dir) == []


def test_all_records_skipped_raises_and_leaves_nothing(tmp_path):
  root = str(tmp_path / 'coco')
  images = [ff.coco_image(i, 'val') for i in (1, 2)]
  ff.write_truncated_jpeg(os.path.join(root, 'val2014', images[0]['file_name']))
  ff.write_coco_captions(root, 'val', images, [(1, 'a'), (2, 'b')])
  with pytest.raises(records.AllRecordsSkippedError, match='corrupt_image=1.*missing_image=1'):
    builders.build('coco_captions', root, tmp_path / 'tfds')
  assert not os.path.exists(tmp_path / 'tfds' / 'coco_captions' / '1.0.0')


def test_missing_annotation_files_error(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'README').write_text('nothing here')
  with pytest.raises(FileNotFoundError, match='captions_'):
    builders.build('coco_captions', tmp_path / 'empty', tmp_path / 'tfds')


@pytest.mark.parametrize('answer, expected', [
    ('Two', '2'), ('two.', '2'), ('a dog', 'dog'), ('The Dogs!', 'dogs'), ('isnt', "isn't"),
    ('1,000', '1000'), ('3.5', '3.5'), ('yes ', 'yes'), ('t-shirt', 't shirt'),
    ('black and white', 'black and white'), ('none', '0')])
def test_vqa_official_answer_normalisation(answer, expected):
  assert vqa_v2.normalize_answer(answer) == expected


def test_vqa_soft_scores_and_vocab(tmp_path):
  root = str(tmp_path / 'vqa')
  for image_id in (1, 2):
    ff.write_image(os.path.join(root, 'train2014', f'COCO_train2014_{image_id:012d}.jpg'))
  ff.write_image(os.path.join(root, 'val2014', 'COCO_val2014_000000000005.jpg'))
  train = [
      dict(question_id=10, image_id=1, question='How many dogs?', multiple_choice_answer='2',
           answers=['two'] * 2 + ['2'] * 2 + ['3'] + ['many'] * 5),
      dict(question_id=11, image_id=1, question='Is it red?', multiple_choice_answer='yes',
           answers=['yes'] * 9 + ['no']),
      dict(question_id=12, image_id=2, question='Is it blue?', multiple_choice_answer='yes',
           answers=['yes'] * 2 + ['no'] * 8),
      dict(question_id=13, image_id=3, question='Missing image?', answers=['yes'] * 10),
      dict(question_id=14, image_id=2, question='  ', answers=['yes'] * 10),
  ]
  ff.write_vqa(root, 'train', train)
  ff.write_vqa(root, 'val', [dict(question_id=50, image_id=5, question='What?',
                                  answers=['A dog'] * 10, multiple_choice_answer='dog')])
  builder = builders.get_builder('vqa_v2', tmp_path / 'tfds',
                                 config=vqa_v2.VqaConfig(name='top2', num_answers=2))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=root))
  # multiple_choice_answer counts: yes 3 (incl. the skipped ones), 2 once -> ['yes', '2'].
  assert builders.load_answer_vocab(builder) == ['yes', '2']
  ex = _examples(builder, 'train', 'question/id')
  assert sorted(ex) == [10, 11, 12]
  # 'two' x2 + '2' x2 normalise to '2': min(4 / 3, 1) = 1; '3' and 'many' are out of vocab.
  np.testing.assert_array_equal(ex[10]['answer/ids'], [1])
  np.testing.assert_allclose(ex[10]['answer/scores'], [1.0])
  np.testing.assert_array_equal(ex[12]['answer/ids'], [0])  # 'no' is out of vocab
  np.testing.assert_allclose(ex[12]['answer/scores'], [2 / 3], rtol=1e-6)
  assert len(ex[10]['answers']) == 10 and ex[10]['answers'][0] == b'two'
  assert ex[11]['question'] == b'Is it red?' and ex[11]['image/id'] == 1
  val = _examples(builder, 'val', 'question/id')
  assert val[50]['answer/ids'].size == 0  # 'dog' is not among the top 2
  assert builder.info.metadata['bad_input']['train'] == {
      'missing_image': 1, 'question_without_image': 1, 'empty_question': 1}


def test_nlvr2(tmp_path):
  root = str(tmp_path / 'nlvr2')
  train = [dict(identifier='train-1-0-0', sentence='Both images show dogs.', label='True',
                directory='7'),
           dict(identifier='train-1-0-1', sentence='One image shows a cat.', label='False',
                directory='7'),
           dict(identifier='train-2-1-0', sentence='Missing.', label='True', directory='3'),
           dict(identifier='train-3-0-0', sentence='Bad label.', label='maybe',
                directory='7')]
  ff.write_nlvr2(root, 'train', train)
  left = ff.write_image(ff.nlvr2_image_path(root, 'train', 'train-1-0-0', 0, '7'), fmt='PNG',
                        seed=1)
  ff.write_image(ff.nlvr2_image_path(root, 'train', 'train-1-0-0', 1, '7'), 30, 20, fmt='PNG')
  ff.write_nlvr2(root, 'dev', [dict(identifier='dev-5-0-0', sentence='x', label='False')])
  ff.write_image(ff.nlvr2_image_path(root, 'dev', 'dev-5-0-0', 0), fmt='PNG')
  ff.write_image(ff.nlvr2_image_path(root, 'dev', 'dev-5-0-0', 1), fmt='PNG')
  builder = builders.build('nlvr2', root, tmp_path / 'tfds')
  ex = _examples(builder, 'train', 'id')
  assert sorted(ex) == ['train-1-0-0', 'train-1-0-1']  # both statements share the pair
  assert ex['train-1-0-0']['label'] == 1 and ex['train-1-0-1']['label'] == 0
  assert ex['train-1-0-1']['sentence'] == b'One image shows a cat.'
  assert ex['train-1-0-0']['image1'].shape == (20, 30, 3)
  # PNG -> RGB JPEG (quality 95): close to the original pixels.
  assert np.abs(ex['train-1-0-0']['image0'].astype(int) - left).mean() < 2
  assert list(_examples(builder, 'val', 'id')) == ['dev-5-0-0']
  assert builder.info.metadata['bad_input']['train'] == {
      'converted_image': 4, 'missing_image': 2, 'bad_label': 1}


def test_flickr30k_karpathy_splits(tmp_path):
  root = str(tmp_path / 'flickr')
  images = [dict(filename='1000.jpg', split='train', captions=['A dog runs.', 'dog']),
            dict(filename='1001.jpg', split='restval', captions=['A cat.']),
            dict(filename='1002.jpg', split='val', captions=['', 'A bird.']),
            dict(filename='1003.jpg', split='test', captions=['A fish.'])]
  for im in images:
    ff.write_image(os.path.join(root, 'flickr30k-images', im['filename']))
  ff.write_karpathy(root, 'dataset_flickr30k.json', images)
  builder = builders.build('flickr30k', root, tmp_path / 'tfds')
  assert sorted(_examples(builder, 'train', 'image/id')) == [1000, 1001]  # restval -> train
  val = _examples(builder, 'val', 'image/id')
  assert [c.decode() for c in val[1002]['captions']] == ['A bird.']
  assert list(_examples(builder, 'test', 'image/id')) == [1003]
  assert builder.info.metadata['bad_input']['val'] == {'empty_caption': 1}


@pytest.fixture
def coco_karpathy_dir(tmp_path):
  """dataset_coco.json with every split, both image layouts and bad inputs."""
  root = str(tmp_path / 'coco')
  five = [f'A dog number {k}.' for k in range(5)]
  entries = [
      ff.karpathy_coco_image(9, 'train', five),
      ff.karpathy_coco_image(10, 'restval', ['A cat sits.']),  # restval joins train
      ff.karpathy_coco_image(20, 'val', ['', '  ', None]),  # no usable caption
      ff.karpathy_coco_image(21, 'val', ['A bird.']),  # image under images/val2014/
      ff.karpathy_coco_image(22, 'val', ['A horse.']),  # no filepath: found in val2014/
      ff.karpathy_coco_image(30, 'test', five),
      ff.karpathy_coco_image(31, 'test', five + ['A sixth caption.']),  # a few have 6-7
      ff.karpathy_coco_image(32, 'test', ['missing image']),
      ff.karpathy_coco_image(33, 'test', ['truncated image']),
  ]
  del entries[4]['filepath']
  path = lambda e, *prefix: os.path.join(root, *prefix, 'val2014' if e['cocoid'] != 9
                                         else 'train2014', e['filename'])
  pixels = {9: ff.write_image(path(entries[0]), seed=9),
            30: ff.write_image(path(entries[5]), 30, 20, seed=30)}
  ff.write_image(path(entries[1]), mode='L')
  ff.write_image(path(entries[2]))
  ff.write_image(path(entries[3], 'images'))
  ff.write_image(path(entries[4]))
  ff.write_image(path(entries[6]))
  ff.write_truncated_jpeg(path(entries[8]))
  ff.write_karpathy(root, 'dataset_coco.json', entries)
  return root, pixels


def test_coco_karpathy_splits_captions_images_and_bad_input(coco_karpathy_dir, tmp_path):
  root, pixels = coco_karpathy_dir
  builder = builders.build('coco_karpathy', root, tmp_path / 'tfds')
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      'train': 2, 'val': 2, 'test': 2}
  train = _examples(builder, 'train', 'image/id')
  assert sorted(train) == [9, 10]  # image ids are the COCO ids
  assert [c.decode() for c in train[9]['captions']] == [f'A dog number {k}.' for k in range(5)]
  assert train[9]['image/filename'] == b'COCO_train2014_000000000009.jpg'
  assert np.abs(train[9]['image'].astype(int) - pixels[9]).mean() < 3  # JPEG of the pixels
  assert train[10]['image'].shape == (30, 40, 3)  # grayscale -> RGB
  val = _examples(builder, 'val', 'image/id')
  assert sorted(val) == [21, 22] and val[22]['captions'].tolist() == [b'A horse.']
  test = _examples(builder, 'test', 'image/id')
  assert sorted(test) == [30, 31] and test[30]['image'].shape == (20, 30, 3)
  raw = builder.as_dataset(split='test', decoders={'image': tfds.decode.SkipDecoding()})
  stored = {int(e['image/id']): e['image'] for e in tfds.as_numpy(raw)}
  with open(os.path.join(root, 'val2014', 'COCO_val2014_000000000030.jpg'), 'rb') as f:
    assert stored[30] == f.read()  # an RGB JPEG is stored byte for byte
  assert builder.info.metadata['bad_input'] == {
      'train': {'converted_image': 1}, 'val': {'empty_caption': 3, 'no_captions': 1},
      'test': {'missing_image': 1, 'corrupt_image': 1}}
  # The base caption config evaluates on these references: every caption of each image.
  references = finetune_pipelines.load_references(
      caption_config.get_config('base').data, 'test', data_dir=str(tmp_path / 'tfds'))
  with open(os.path.join(root, 'dataset_coco.json')) as f:
    raw_json = {im['cocoid']: [s['raw'] for s in im['sentences']]
                for im in json.load(f)['images']}
  assert references == {30: raw_json[30], 31: raw_json[31]}
  assert len(references[30]) == 5 and len(references[31]) == 6


def test_coco_karpathy_without_its_json_says_what_to_place(tmp_path):
  ff.write_image(str(tmp_path / 'coco' / 'val2014' / 'COCO_val2014_000000000001.jpg'))
  ff.write_karpathy(str(tmp_path / 'coco'), 'dataset_flickr30k.json',
                    [dict(filename='1.jpg', split='test', captions=['a'])])
  with pytest.raises(FileNotFoundError, match='dataset_coco.json not found.*train2014'):
    builders.build('coco_karpathy', tmp_path / 'coco', tmp_path / 'tfds')


def test_visual_genome_top_k_vocabularies(tmp_path):
  root = str(tmp_path / 'vg')
  images = [dict(image_id=1, width=40, height=30), dict(image_id=2, width=40, height=30),
            dict(image_id=3, width=40, height=30)]
  for im in images:
    ff.write_image(os.path.join(root, 'VG_100K', f'{im["image_id"]}.jpg'))
  objects = {
      1: [dict(object_id=11, x=4, y=3, w=10, h=6, names=['Man'], attributes=['tall', 'Happy']),
          dict(object_id=12, x=0, y=0, w=5, h=5, names=['tree'], attributes=['green']),
          dict(object_id=13, x=0, y=0, w=5, h=5, names=['kite'])],
      2: [dict(object_id=21, x=30, y=20, w=20, h=20, names=['man'], attributes=['happy'])],
      3: [dict(object_id=31, x=1, y=1, w=2, h=2, names=['tree'])],
  }
  ff.write_visual_genome(root, images, objects)
  config = visual_genome.VisualGenomeConfig(name='top2', num_classes=2, num_attributes=1,
                                            val_every=3)
  builder = builders.get_builder('visual_genome', tmp_path / 'tfds', config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  # man 2, tree 2, kite 1 -> [man, tree]; happy 2, green 1, tall 1 -> [happy].
  assert builders.load_class_names(builder) == ['man', 'tree']
  assert builders.load_attribute_names(builder) == ['happy']
  train = _examples(builder, 'train', 'image/id')
  assert sorted(train) == [1, 2] and list(_examples(builder, 'val', 'image/id')) == [3]
  np.testing.assert_allclose(train[1]['objects']['bbox'][0], [0.1, 0.1, 0.3, 0.35], rtol=1e-6)
  np.testing.assert_array_equal(train[1]['objects']['label'], [0, 1])
  np.testing.assert_array_equal(train[1]['objects']['attributes'][:, 0], [0, -1])
  np.testing.assert_allclose(train[2]['objects']['bbox'][0], [20 / 30, 30 / 40, 1, 1])
  assert builder.info.metadata['bad_input']['train'] == {'rare_class': 1, 'clipped_box': 1}


@pytest.fixture(scope='module')
def tiny_corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('corpus'))
  corpus.generate(root, num_train=6, num_val=4, seed=3, workers=1)
  return root


def test_embedded_builders_read_the_corpus(tiny_corpus, tmp_path):
  data_dir = tmp_path / 'tfds'
  builder = builders.build('embedded', tiny_corpus, data_dir)
  assert builders.load_class_names(builder) == list(corpus.SHAPES)
  assert builders.load_attribute_names(builder) == list(corpus.ATTRIBUTES)
  ex = _examples(builder, 'train', 'image/id')
  assert sorted(ex) == list(range(1, 7))
  instances = _json(tiny_corpus, 'annotations/instances_train2014.json')
  for image_id, example in ex.items():
    anns = [a for a in instances['annotations'] if a['image_id'] == image_id]
    expected = [[y / 96, x / 96, (y + h) / 96, (x + w) / 96] for x, y, w, h in
                (a['bbox'] for a in anns)]
    np.testing.assert_allclose(example['objects']['bbox'], expected, rtol=1e-6)
    np.testing.assert_array_equal(example['objects']['label'],
                                  [a['category_id'] - 1 for a in anns])
    assert len(example['captions']) == 5
  for name, split, expected in (('embedded_vqa', 'val', 8), ('embedded_nlvr2', 'val', 2),
                                ('embedded_retrieval', 'test', 2)):
    b = builders.build(name, tiny_corpus, data_dir)
    assert b.info.splits[split].num_examples == expected, name


def test_prepare_embedded_is_idempotent(tmp_path):
  kwargs = dict(num_train=4, num_val=2, seed=1, vocab_size=128)
  data_dir, vocab = builders.prepare_embedded(tmp_path, **kwargs)
  reread = builders.get_builder('embedded', data_dir)
  assert reread.info.splits['train'].num_examples == 4
  assert builders.load_class_names(reread) == list(corpus.SHAPES)
  with open(vocab) as f:
    assert len(f.read().splitlines()) == 128
  stamp = os.path.getmtime(vocab), os.path.getmtime(os.path.join(data_dir, 'embedded'))
  assert builders.prepare_embedded(tmp_path, **kwargs) == (data_dir, vocab)
  assert (os.path.getmtime(vocab), os.path.getmtime(os.path.join(data_dir, 'embedded'))) == stamp
  assert not [p for p in os.listdir(tmp_path / 'raw') if p.startswith('.')]  # no temp left


_KILLED_GENERATION = """
import os, signal, sys
from e2e_vlp.data import builders, corpus
write = corpus.generate
def generate_then_die(out_dir, **kwargs):
  write(out_dir, **kwargs)
  os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
corpus.generate = generate_then_die
builders._generate_corpus_once(sys.argv[1], num_train=2, num_val=2, seed=3)
"""


def test_killed_corpus_generation_is_cleaned_up_by_the_next_run(tmp_path):
  raw_dir = os.path.join(tmp_path, 'raw', 'corpus')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  killed = subprocess.run([sys.executable, '-c', _KILLED_GENERATION, raw_dir], cwd=root,
                          env=dict(os.environ, PYTHONPATH=root), capture_output=True)
  assert killed.returncode == -9, killed.stderr.decode()[-2000:]
  [orphan] = os.listdir(tmp_path / 'raw')
  assert orphan.startswith('.corpus.tmp-') and not os.path.exists(raw_dir)
  # A folder of a live generation on this host, and one of another host, stay.
  live = tmp_path / 'raw' / f'.corpus.tmp-{socket.gethostname()}-{os.getpid()}-x'
  other_host = tmp_path / 'raw' / '.corpus.tmp-some-other-host-1-x'
  live.mkdir()
  other_host.mkdir()

  generate_once = builders._generate_corpus_once  # pylint: disable=protected-access
  generate_once(raw_dir, num_train=2, num_val=2, seed=3)
  assert sorted(os.listdir(tmp_path / 'raw')) == sorted(['corpus', live.name, other_host.name])
  assert os.path.exists(os.path.join(raw_dir, 'annotations', 'captions_train2014.json'))


def test_eval_pipeline_seed_leaves_the_corpus_alone(tmp_path):
  """`data.seed` draws the evaluation's negatives and masks; only `data.corpus_seed` names
  another corpus (`--config.data.seed=S` once silently generated a new corpus)."""
  config = pretrain.get_config('tiny')
  config.cache_dir = str(tmp_path)
  config.model.vocab_size = 128
  config.data.corpus_train_images, config.data.corpus_val_images = 4, 2
  first = prepare.resolve(config).data_dir
  config.data.seed = 5
  assert prepare.resolve(config).data_dir == first
  assert len(os.listdir(tmp_path / 'raw')) == 1
  config.data.corpus_seed = 1
  assert prepare.resolve(config).data_dir != first
  assert len(os.listdir(tmp_path / 'raw')) == 2
