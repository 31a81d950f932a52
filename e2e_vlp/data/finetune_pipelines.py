"""Fine-tuning batches (VQA, NLVR2, retrieval, captioning) on the shared pipeline machinery.

Each task is an example function (decode happens before it, augmentation inside it) and a
batch function (tokenization), plugged into `pipeline.make_iterator`, so shuffling, per-host
splitting, eval padding (`valid`), corrupt-record skipping and exact resumption are those of
pre-training. Text that the horizontal flip would contradict ("left of") is swapped with the
pixels by `augment`; NLVR2 refuses flips, because its "left" / "right" name the two images.
"""

from typing import Any

import tensorflow as tf

from e2e_vlp.data import augment as augment_lib
from e2e_vlp.data import pipeline

Features = pipeline.Features


def _augment_image(image: tf.Tensor, text: tf.Tensor, seed: tf.Tensor,
                   options: augment_lib.AugmentOptions, train: bool) -> tuple[Features, tf.Tensor]:
  """-> ({image [S, S, 3], image_mask [S, S]}, text [C] flipped with the pixels)."""
  out = augment_lib.augment(image, tf.zeros([0, 4], tf.float32), text, seed, options,
                            train=train)
  return {'image': out['image'], 'image_mask': out['image_mask']}, out['captions']


def _pick_caption(captions: tf.Tensor, seed: tf.Tensor, train: bool) -> tf.Tensor:
  """A random caption in training, the first in eval; '' when there is none."""
  count = tf.shape(captions)[0]
  pick = (tf.random.stateless_uniform([], seed, 0, tf.maximum(count, 1), tf.int32)
          if train else 0)
  return tf.cond(count > 0, lambda: captions[tf.minimum(pick, count - 1)],
                 lambda: tf.constant(''))


def _encoder_text(tokenizer: pipeline.Tokenizer, data_config: Any, batch: Features,
                  key: str) -> Features:
  """Replaces the string feature `key` [b] by text_ids / text_mask [b, L]."""
  batch = dict(batch)
  ids, mask = pipeline.encoder_text(tokenizer, tokenizer.tokenize(batch.pop(key)),
                                    int(data_config.max_text_len))
  batch.update(text_ids=ids, text_mask=mask)
  return batch


# ----------------------------------------------------------------------------------- VQA


def vqa_example_fn(data_config: Any, num_answers: int, *, train: bool):
  """Image, question, dense soft answer scores [A] and the question id."""
  options = augment_lib.AugmentOptions.from_config(data_config)

  def fn(example: Features, seed: tf.Tensor) -> Features:
    features, question = _augment_image(example['image'], example['question'][None], seed,
                                        options, train)
    ids = tf.cast(example['answer/ids'], tf.int64)[:, None]
    features.update(
        question=question[0],
        answer_scores=tf.scatter_nd(ids, tf.cast(example['answer/scores'], tf.float32),
                                    [num_answers]),
        question_id=tf.cast(example['question/id'], tf.int64))
    return features

  return fn


def vqa_batch_fn(data_config: Any, tokenizer: pipeline.Tokenizer):
  """Encoder text [CLS] question [SEP]."""
  def fn(batch: Features, seed: tf.Tensor) -> Features:
    del seed
    return _encoder_text(tokenizer, data_config, batch, 'question')
  return fn


def make_vqa_iterator(data_config: Any, tokenizer: pipeline.Tokenizer, *, num_answers: int,
                      split: str, train: bool, global_batch_size: int,
                      **kwargs) -> pipeline.DatasetIterator:
  """VQA batches: image [b, S, S, 3], image_mask [b, S, S], text_ids / text_mask [b, L]
  ([CLS] question [SEP]), answer_scores [b, A] f32 (official soft scores), question_id [b]
  i64, valid [b]. kwargs: those of `pipeline.make_iterator` (seed, dataset, data_dir, ...).
  """
  return pipeline.make_iterator(
      data_config, vqa_example_fn(data_config, num_answers, train=train),
      vqa_batch_fn(data_config, tokenizer), split=split, train=train,
      global_batch_size=global_batch_size, **kwargs)


# --------------------------------------------------------------------------------- NLVR2


def nlvr2_example_fn(data_config: Any, *, train: bool):
  """Both images (independent augmentation draws), the statement and its label."""
  options = augment_lib.AugmentOptions.from_config(data_config)
  if train and options.hflip_prob > 0:
    raise ValueError(f'config.data.hflip_prob={options.hflip_prob}: NLVR2 statements name the '
                     '"left" and "right" image, which a flip would contradict; set it to 0.')

  def fn(example: Features, seed: tf.Tensor) -> Features:
    seeds = tf.unstack(tf.random.split(seed, 2))
    features = {}
    for i in (0, 1):
      image, _ = _augment_image(example[f'image{i}'], tf.constant([''], tf.string), seeds[i],
                                options, train)
      features[f'image{i}'] = image['image']
      features[f'image{i}_mask'] = image['image_mask']
    features['sentence'] = example['sentence']
    features['label'] = tf.cast(example['label'], tf.int32)
    return features

  return fn


def nlvr2_batch_fn(data_config: Any, tokenizer: pipeline.Tokenizer):
  """Encoder text [CLS] statement [SEP] (paired with each image by the model)."""
  def fn(batch: Features, seed: tf.Tensor) -> Features:
    del seed
    return _encoder_text(tokenizer, data_config, batch, 'sentence')
  return fn


def make_nlvr2_iterator(data_config: Any, tokenizer: pipeline.Tokenizer, *, split: str,
                        train: bool, global_batch_size: int,
                        **kwargs) -> pipeline.DatasetIterator:
  """NLVR2 batches: image0 / image1 [b, S, S, 3], image0_mask / image1_mask [b, S, S],
  text_ids / text_mask [b, L], label [b] i32 (1 = true), valid [b]."""
  return pipeline.make_iterator(
      data_config, nlvr2_example_fn(data_config, train=train),
      nlvr2_batch_fn(data_config, tokenizer), split=split, train=train,
      global_batch_size=global_batch_size, **kwargs)


# ------------------------------------------------------------------- retrieval (train)


def pair_example_fn(data_config: Any, *, train: bool):
  """Image and one of its captions (random in training, the first in eval)."""
  options = augment_lib.AugmentOptions.from_config(data_config)

  def fn(example: Features, seed: tf.Tensor) -> Features:
    seed_augment, seed_caption = tf.unstack(tf.random.split(seed, 2))
    features, captions = _augment_image(example['image'], example['captions'], seed_augment,
                                        options, train)
    features['caption'] = _pick_caption(captions, seed_caption, train)
    features['image_id'] = tf.cast(example['image/id'], tf.int64)
    return features

  return fn


def pair_batch_fn(data_config: Any, tokenizer: pipeline.Tokenizer):
  """Encoder text ([CLS] caption [SEP]) and decoder text ([BOS] caption / caption [EOS])."""
  def fn(batch: Features, seed: tf.Tensor) -> Features:
    del seed
    batch = dict(batch)
    tokens = tokenizer.tokenize(batch.pop('caption'))
    text_ids, text_mask = pipeline.encoder_text(tokenizer, tokens, int(data_config.max_text_len))
    caption_in, caption_out, caption_mask = pipeline.decoder_text(
        tokenizer, tokens, int(data_config.max_caption_len))
    batch.update(text_ids=text_ids, text_mask=text_mask, caption_in=caption_in,
                 caption_out=caption_out, caption_mask=caption_mask,
                 image_group=tf.cast(batch['image_id'], tf.int32))
    return batch
  return fn


def make_pair_iterator(data_config: Any, tokenizer: pipeline.Tokenizer, *, split: str,
                       train: bool, global_batch_size: int,
                       **kwargs) -> pipeline.DatasetIterator:
  """Image-caption pairs (retrieval and caption training; caption eval images).

  Batches: image [b, S, S, 3], image_mask [b, S, S], image_id [b] i64, image_group [b] i32
  (the id's low 32 bits: equal on rows of one image, for in-batch negatives), text_ids /
  text_mask [b, L], caption_in / caption_out / caption_mask [b, T], valid [b].
  """
  return pipeline.make_iterator(
      data_config, pair_example_fn(data_config, train=train),
      pair_batch_fn(data_config, tokenizer), split=split, train=train,
      global_batch_size=global_batch_size, **kwargs)


# --------------------------------------------------------------------- retrieval (eval)


def gallery_example_fn(data_config: Any, captions_per_image: int):
  """Eval image and its first `captions_per_image` captions (padded with '')."""
  options = augment_lib.AugmentOptions.from_config(data_config)

  def fn(example: Features, seed: tf.Tensor) -> Features:
    features, captions = _augment_image(example['image'], example['captions'], seed, options,
                                        train=False)
    features['captions'] = pipeline.pad_rows(captions, captions_per_image, '')
    features['caption_valid'] = tf.range(captions_per_image) < tf.shape(captions)[0]
    features['image_id'] = tf.cast(example['image/id'], tf.int64)
    return features

  return fn


def gallery_batch_fn(data_config: Any, tokenizer: pipeline.Tokenizer):
  """Encoder text of every caption slot: text_ids / text_mask [b, C, L]."""
  def fn(batch: Features, seed: tf.Tensor) -> Features:
    del seed
    batch = dict(batch)
    captions = batch.pop('captions')  # [b, C]
    shape = tf.shape(captions)
    length = int(data_config.max_text_len)
    ids, mask = pipeline.encoder_text(tokenizer, tokenizer.tokenize(tf.reshape(captions, [-1])),
                                      length)
    batch['text_ids'] = tf.reshape(ids, [shape[0], shape[1], length])
    batch['text_mask'] = tf.reshape(mask, [shape[0], shape[1], length])
    return batch
  return fn


def make_gallery_iterator(data_config: Any, tokenizer: pipeline.Tokenizer, *,
                          captions_per_image: int, split: str, global_batch_size: int,
                          **kwargs) -> pipeline.DatasetIterator:
  """Retrieval eval batches, one pass: image [b, S, S, 3], image_mask [b, S, S], image_id [b]
  i64, text_ids / text_mask [b, C, L], caption_valid [b, C] bool, valid [b]."""
  return pipeline.make_iterator(
      data_config, gallery_example_fn(data_config, captions_per_image),
      gallery_batch_fn(data_config, tokenizer), split=split, train=False,
      global_batch_size=global_batch_size, **kwargs)


# ----------------------------------------------------------------------------- detection


def make_detection_iterator(data_config: Any, tokenizer: pipeline.Tokenizer, *, split: str,
                            global_batch_size: int, **kwargs) -> pipeline.DatasetIterator:
  """Pre-training eval batches plus original_size [b, 2] i32 (height, width of the stored
  image), the frame official detection results are given in."""
  pretrain_fn = pipeline.pretrain_example_fn(data_config, train=False)

  def example_fn(example: Features, seed: tf.Tensor) -> Features:
    features = dict(pretrain_fn(example, seed))
    features['original_size'] = tf.shape(example['image'])[:2]
    return features

  return pipeline.make_iterator(data_config, example_fn,
                                pipeline.pretrain_batch_fn(data_config, tokenizer), split=split,
                                train=False, global_batch_size=global_batch_size, **kwargs)


# ------------------------------------------------------------------- eval annotations


def _whole_split(data_config: Any, split: str, dataset: str | None,
                 data_dir: str | None) -> tf.data.Dataset:
  """Every example of a split (all hosts read all of it), images left undecoded."""
  source, _ = pipeline.load_split(dataset or data_config.dataset, split,
                                  data_dir=data_dir or data_config.data_dir, process_index=0,
                                  process_count=1, shuffle_seed=None)
  return source


def load_vqa_annotations(data_config: Any, split: str, *, dataset: str | None = None,
                         data_dir: str | None = None) -> list[dict[str, Any]]:
  """The split's annotations in the official format, for `e2e_vlp.eval.vqa`:
  [{question_id, answers: [str] (empty on unannotated test splits), answer_type,
  question_type}]."""
  source = _whole_split(data_config, split, dataset, data_dir).map(
      lambda ex: {k: ex[k] for k in ('question/id', 'answers', 'answer_type', 'question_type')})
  return [{'question_id': int(ex['question/id']),
           'answers': [a.decode('utf-8') for a in ex['answers']],
           'answer_type': ex['answer_type'].decode('utf-8'),
           'question_type': ex['question_type'].decode('utf-8')}
          for ex in source.as_numpy_iterator()]


def load_references(data_config: Any, split: str, *, dataset: str | None = None,
                    data_dir: str | None = None) -> dict[int, list[str]]:
  """{image id: [reference caption, ...]} of an image-text split (caption evaluation)."""
  source = _whole_split(data_config, split, dataset, data_dir).map(
      lambda ex: {'id': ex['image/id'], 'captions': ex['captions']})
  return {int(ex['id']): [c.decode('utf-8') for c in ex['captions']]
          for ex in source.as_numpy_iterator()}
