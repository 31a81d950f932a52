"""Input pipeline: batch contract, ITM negatives, determinism, exact resume, corrupt records."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import pretrain
from e2e_vlp.data import pipeline
from e2e_vlp.data import tokenizer as tokenizer_lib

SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '[BOS]', '[EOS]')
WORDS = ('a', 'photo', 'of', 'on', 'the', 'left', 'right') + tuple(f'img{i}' for i in range(40))
K = 3  # attributes per object


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  """The project's WordPiece tokenizer over a word-level vocab.txt written here."""
  path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
  path.write_text(''.join(t + '\n' for t in SPECIALS + WORDS))
  return tokenizer_lib.Tokenizer.from_vocab_file(path)


def _data_config(**overrides):
  config = ml_collections.ConfigDict(pretrain.get_config('tiny').data.to_dict())
  config.update(dict(image_size=32, resize_sizes=(24, 32), max_size=32, max_boxes=4,
                     max_text_len=10, max_caption_len=8, shuffle_buffer=64))
  config.update(overrides)
  return config


def _examples(n, *, corrupt=(), truncated=(), image_ids=None, seed=0):
  """Encoded images of random sizes; captions 'img<image id> ...'; 0-3 boxes each."""
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(n):
    image_id = i if image_ids is None else image_ids[i]
    h, w = rng.integers(16, 40, 2)
    png = tf.io.encode_png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).numpy()
    if i in corrupt:
      png = b'not an image at all'
    elif i in truncated:
      png = png[:len(png) // 2]
    m = i % 4
    corners = np.sort(rng.uniform(0, 1, (m, 2, 2)), axis=1)  # [m, (min, max), (y, x)]
    examples.append({
        'image/id': np.int64(image_id), 'image': png,
        'captions': [f'img{image_id} on the left', f'img{image_id} a photo'],
        'objects': {'bbox': corners.reshape(m, 4).astype(np.float32),  # yxyx
                    'label': np.arange(m, dtype=np.int64) + i,
                    'attributes': rng.integers(-1, 12, (m, K)).astype(np.int64)},
    })
  return examples


def _make(tokenizer, examples, *, train=True, seed=0, batch=4, process_index=0,
          process_count=1, **overrides):
  return pipeline.make_pretrain_dataset(
      _data_config(**overrides), tokenizer, split='train', train=train,
      global_batch_size=batch * process_count, process_index=process_index,
      process_count=process_count, seed=seed, source=pipeline.from_examples(examples))


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_contract_eval_matches_source(tokenizer):
  examples = _examples(6)
  batches = list(_make(tokenizer, examples, train=False, mlm_prob=0.0, itm_neg_prob=0.0))
  assert len(batches) == 2
  b = batches[0]
  shapes = {k: (v.shape, v.dtype.name) for k, v in b.items()}
  assert shapes == {
      'image': ((4, 32, 32, 3), 'float32'), 'image_mask': ((4, 32, 32), 'bool'),
      'text_ids': ((4, 10), 'int32'), 'text_mask': ((4, 10), 'bool'),
      'mlm_labels': ((4, 10), 'int32'), 'itm_label': ((4,), 'int32'),
      'caption_in': ((4, 8), 'int32'), 'caption_out': ((4, 8), 'int32'),
      'caption_mask': ((4, 8), 'bool'), 'boxes': ((4, 4, 4), 'float32'),
      'labels': ((4, 4), 'int32'), 'attributes': ((4, 4, pipeline.MAX_ATTRIBUTES), 'int32'),
      'box_mask': ((4, 4), 'bool'), 'image_id': ((4,), 'int64'), 'valid': ((4,), 'bool'),
      'skipped_records': ((), 'int64')}
  rows = [(batch, r) for batch in batches for r in range(4)]
  assert [int(bt['valid'][r]) for bt, r in rows] == [1] * 6 + [0] * 2
  for i, ((bt, r), ex) in enumerate(zip(rows, examples)):
    assert bt['image_id'][r] == ex['image/id'] == i
    # Eval: the first caption, no flip; [CLS] img<i> on the left [SEP] [PAD]...
    words = [tokenizer.id_to_token(int(t)) for t in bt['text_ids'][r][bt['text_mask'][r]]]
    assert words == ['[CLS]', f'img{i}', 'on', 'the', 'left', '[SEP]']
    assert not bt['text_mask'][r][len(words):].any()
    length = int(bt['caption_mask'][r].sum())
    assert length == 5
    assert bt['caption_in'][r][0] == tokenizer.bos_id
    np.testing.assert_array_equal(bt['caption_in'][r][1:length], bt['caption_out'][r][:length - 1])
    assert bt['caption_out'][r][length - 1] == tokenizer.eos_id
    # Boxes: the source's yxyx boxes as cxcywh (resizing leaves normalised boxes unchanged).
    y0, x0, y1, x1 = ex['objects']['bbox'].T
    expected = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
    m = len(expected)
    np.testing.assert_allclose(bt['boxes'][r][:m], expected, atol=1e-6)
    assert bt['box_mask'][r].tolist() == [True] * m + [False] * (4 - m)
    assert bt['labels'][r].tolist() == ex['objects']['label'].tolist() + [-1] * (4 - m)
    np.testing.assert_array_equal(bt['attributes'][r][:m, :K], ex['objects']['attributes'])
    assert (bt['attributes'][r][m:] == -1).all() and (bt['attributes'][r][:, K:] == -1).all()
  assert (batches[0]['itm_label'] == 1).all() and (batches[0]['mlm_labels'] == -1).all()


def test_itm_negatives_never_own_image(tokenizer):
  # Image ids repeat (two records per image) so collisions happen inside batches.
  examples = _examples(24, image_ids=[i // 2 for i in range(24)])
  it = _make(tokenizer, examples, batch=8, mlm_prob=0.0, itm_neg_prob=0.5, hflip_prob=0.0)
  img0 = tokenizer.token_to_id('img0')
  labels = []
  for _ in range(12):
    b = next(it)
    caption_image = b['text_ids'][:, 1] - img0  # the 'img<id>' word names the caption's image
    own = b['caption_in'][:, 1] - img0
    np.testing.assert_array_equal(own, b['image_id'])
    np.testing.assert_array_equal(caption_image == b['image_id'], b['itm_label'] == 1)
    labels += b['itm_label'].tolist()
  assert abs(np.mean(labels) - 0.5) < 0.13  # 96 draws: about 2.5 sigma


def test_mlm_labels_restore_the_unmasked_text(tokenizer):
  # The pre-training evaluation scores ITM on where(mlm_labels >= 0, mlm_labels, text_ids).
  examples = _examples(16, image_ids=[i // 2 for i in range(16)])
  masked = _make(tokenizer, examples, batch=8, mlm_prob=0.4, itm_neg_prob=0.5)
  clean = _make(tokenizer, examples, batch=8, mlm_prob=0.0, itm_neg_prob=0.5)
  for _ in range(4):
    m, c = next(masked), next(clean)
    assert (m['mlm_labels'] >= 0).any() and (c['mlm_labels'] < 0).all()
    np.testing.assert_array_equal(m['itm_label'], c['itm_label'])
    np.testing.assert_array_equal(
        np.where(m['mlm_labels'] >= 0, m['mlm_labels'], m['text_ids']), c['text_ids'])


def test_same_seed_same_batches_and_exact_resume(tokenizer, tmp_path):
  # 14 records, 1 corrupt, batches of 4: the 10 batches after the save cross epoch boundaries.
  examples = _examples(14, corrupt={5})
  reference = _make(tokenizer, examples, seed=3)
  head = [next(reference) for _ in range(3)]
  state = reference.get_state()
  reference.save_state(str(tmp_path / 'state'))
  tail = [next(reference) for _ in range(10)]

  again = _make(tokenizer, examples, seed=3)
  assert all(_same(a, next(again)) for a in head + tail)
  # Restoring rewinds an iterator that has moved on, from bytes and from a file alike.
  resumed = _make(tokenizer, examples, seed=3)
  resumed.set_state(state)
  assert all(_same(a, next(resumed)) for a in tail)
  resumed.restore_state(str(tmp_path / 'state'))
  assert all(_same(a, next(resumed)) for a in tail)

  # The corrupt record never appears; it is counted once per pass (52 examples read: >= 3).
  ids = np.concatenate([b['image_id'] for b in head + tail])
  assert 5 not in ids and set(ids) == set(range(14)) - {5}
  counts = [int(b['skipped_records']) for b in head + tail]
  assert counts == sorted(counts) and counts[-1] >= 3
  # MLM: only on real words, never on [CLS]/[SEP]/[PAD].
  for b in tail:
    masked = b['mlm_labels'] >= 0
    assert (b['text_mask'] | ~masked).all()
    assert not np.isin(b['mlm_labels'][masked], tokenizer.special_ids).any()
    assert (b['text_ids'][:, 0] == tokenizer.cls_id).all()
  assert np.mean([(b['mlm_labels'] >= 0).any() for b in tail]) > 0.5


def test_corrupt_records_skipped_and_counted(tokenizer):
  # Eval order is fixed, so the count after each batch is known: records 3 (garbage bytes)
  # and 6 (truncated PNG) are skipped.
  examples = _examples(10, corrupt={3}, truncated={6})
  batches = list(_make(tokenizer, examples, train=False, max_attributes=2))
  ids = [int(i) for b in batches for i, v in zip(b['image_id'], b['valid']) if v]
  assert ids == [0, 1, 2, 4, 5, 7, 8, 9]
  # config.data.max_attributes cuts the 3 source attributes to 2.
  np.testing.assert_array_equal(batches[1]['attributes'][3][:1],  # record 9, 1 object
                                examples[9]['objects']['attributes'][:, :2])
  # Batch 0 reads records 0-4 (3 skipped), batch 1 reads 5-9 (6 skipped), batch 2 is padding.
  assert [int(b['skipped_records']) for b in batches] == [1, 2, 2]
  assert [int(b['valid'].sum()) for b in batches] == [4, 4, 0]


def test_hosts_split_the_data_and_run_the_same_steps(tokenizer):
  examples = _examples(10)
  hosts = [list(_make(tokenizer, examples, train=False, process_index=p, process_count=2))
           for p in range(2)]
  assert [len(h) for h in hosts] == [2, 2]  # 5 examples per host -> 2 batches of 4
  ids = [int(i) for h in hosts for b in h for i, v in zip(b['image_id'], b['valid']) if v]
  assert sorted(ids) == list(range(10))


def test_global_batch_must_divide(tokenizer):
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.make_pretrain_dataset(_data_config(), tokenizer, split='train', train=True,
                                   global_batch_size=5, process_index=0, process_count=2,
                                   source=pipeline.from_examples(_examples(4)))


def _build_tfds(data_dir, examples):
  """A TFDS dataset 'pipeline_test/x' in the builders' format (images stored as PNG)."""
  features = tfds.features.FeaturesDict({
      'image/id': tf.int64, 'image': tfds.features.Image(shape=(None, None, 3)),
      'captions': tfds.features.Sequence(tf.string),
      'objects': tfds.features.Sequence({
          'bbox': tfds.features.BBoxFeature(), 'label': tf.int64,
          'attributes': tfds.features.Tensor(shape=(K,), dtype=tf.int64)})})
  decoded = [dict(ex, image=tf.io.decode_png(ex['image']).numpy()) for ex in examples]
  source = tf.data.Dataset.from_generator(lambda: iter(decoded),
                                          output_signature=features.get_tensor_spec())
  tfds.dataset_builders.TfDataBuilder(
      name='pipeline_test', config='x', version='1.0.0', split_datasets={'train': source},
      features=features, data_dir=str(data_dir)).download_and_prepare()


def _corrupt_record(data_dir, position):
  """Replaces the image bytes of the record at `position` of the shard; returns all ids."""
  [path] = tf.io.gfile.glob(f'{data_dir}/pipeline_test/x/1.0.0/*.tfrecord*')
  records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
  example = tf.train.Example.FromString(records[position])
  example.features.feature['image'].bytes_list.value[0] = b'\xff\xd8 broken'
  records[position] = example.SerializeToString()
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  ids = [tf.train.Example.FromString(r).features.feature['image/id'].int64_list.value[0]
         for r in records]
  return ids


def test_tfds_source_split_per_host_with_corrupt_record(tokenizer, tmp_path):
  # Host 0 of 2 reads records 0-4 of the shard; record 2 has corrupt bytes after the build.
  _build_tfds(tmp_path, _examples(10))
  ids = _corrupt_record(tmp_path, 2)
  batches = list(pipeline.make_pretrain_dataset(
      _data_config(), tokenizer, split='train', train=False, global_batch_size=8,
      process_index=0, process_count=2, seed=0, dataset='pipeline_test/x',
      data_dir=str(tmp_path)))
  assert len(batches) == 2  # ceil(5 / 4) batches on every host
  assert batches[0]['image_id'].tolist() == [ids[0], ids[1], ids[3], ids[4]]
  assert batches[0]['valid'].all() and not batches[1]['valid'].any()
  assert int(batches[0]['skipped_records']) == 1


def test_skipping_autograph_leaves_the_batches_unchanged(tokenizer, monkeypatch):
  """The pipeline's functions skip AutoGraph (`pipeline.plain_tf`); converted, as tf.data
  would otherwise do, they give the same batches, train and eval."""
  examples = _examples(10, corrupt={3})

  def batches():
    return [next(_make(tokenizer, examples, seed=5))] + list(
        _make(tokenizer, examples, train=False))

  plain = batches()
  monkeypatch.setattr(pipeline, 'plain_tf', lambda fn: fn)  # tf.data converts them now
  converted = batches()
  assert len(plain) == len(converted) == 4
  assert all(_same(a, b) for a, b in zip(plain, converted))
