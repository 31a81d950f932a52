"""tf.data input pipelines: per-host split, decode, augment, tokenize, mask, batch, resume.

One machinery (`build`) serves every task: a per-example function (decode is done before it,
augmentation inside it) and a per-batch function (text work that needs the whole batch, such
as ITM negatives, plus tokenization) plug into the same shuffle / skip-corrupt / batch / pad /
prefetch / checkpoint steps. Every random draw is a stateless op seeded from
(seed, process, position in the stream), so equal seeds give equal batches and a restored
iterator continues exactly where it stopped.

Stream positions come from `enumerate` before and after `ignore_errors`: their difference is
the number of records skipped so far (undecodable images), reported in every batch as
`skipped_records`.
"""

import io
import math
import os
import tarfile
import tempfile
from typing import Any, Callable, Iterable, Protocol

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from e2e_vlp.data import augment as augment_lib
from e2e_vlp.data import builders
from e2e_vlp.data import masking

Features = dict[str, Any]
ExampleFn = Callable[[Features, tf.Tensor], Features]
BatchFn = Callable[[Features, tf.Tensor], Features]

IMAGE_KEYS = ('image', 'image0', 'image1')
# Attributes kept per object when config.data has no `max_attributes` (assumed: the embedded
# corpus has 2 per object, a colour and a size; Visual Genome objects rarely have more).
MAX_ATTRIBUTES = 4
# Batches prefetched when config.data has no `prefetch`: a fixed small buffer bounds the
# iterator state, which holds every buffered batch (assumed; big_vision also uses 2).
PREFETCH = 2
_EXAMPLE_STREAM, _BATCH_STREAM = 0, 1
_CHECKPOINT_PREFIX = 'iterator'
# The map functions are plain TensorFlow (tf.cond / tf.while_loop where a tensor decides;
# Python `if`s only on Python values), so AutoGraph's source conversion of them and of
# everything they call is skipped: it was most of a pipeline's build time (README).
plain_tf = tf.autograph.experimental.do_not_convert


class Tokenizer(Protocol):
  """What the pipeline needs from e2e_vlp.data.tokenizer.Tokenizer."""
  pad_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  bos_id: int
  eos_id: int
  vocab_size: int
  special_ids: Iterable[int]

  def tokenize(self, strings: tf.Tensor) -> tf.RaggedTensor:
    ...


class DatasetIterator:
  """Host-local numpy batches from a tf.data pipeline, with a savable position.

  `get_state()` / `set_state(blob)` move the position as bytes (for orbax, one blob per host);
  `save_state(path)` / `restore_state(path)` write and read it as a file.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self.dataset = dataset
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

  @property
  def element_spec(self) -> Any:
    return self.dataset.element_spec

  def __iter__(self) -> 'DatasetIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return tf.nest.map_structure(lambda x: x.numpy(), next(self._iterator))

  def save_state(self, path: str) -> None:
    with open(path, 'wb') as f:
      f.write(self.get_state())

  def restore_state(self, path: str) -> None:
    with open(path, 'rb') as f:
      self.set_state(f.read())

  def get_state(self) -> bytes:
    """The iterator position (tf.train.Checkpoint files, packed into one tar)."""
    with tempfile.TemporaryDirectory() as directory:
      self._checkpoint.write(os.path.join(directory, _CHECKPOINT_PREFIX))
      buffer = io.BytesIO()
      with tarfile.open(fileobj=buffer, mode='w') as tar:
        for name in sorted(os.listdir(directory)):
          tar.add(os.path.join(directory, name), arcname=name)
      return buffer.getvalue()

  def set_state(self, blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
      with tarfile.open(fileobj=io.BytesIO(blob), mode='r') as tar:
        tar.extractall(directory, filter='data')
      self._checkpoint.read(os.path.join(directory, _CHECKPOINT_PREFIX)).assert_consumed()


# ------------------------------------------------------------------------------ sources


def load_split(dataset_name: str, split: str, *, data_dir: str | None, process_index: int,
               process_count: int, shuffle_seed: int | None) -> tuple[tf.data.Dataset, int]:
  """This host's share of a TFDS split, images left encoded, and the split's example count.

  Images stay as bytes so that decoding happens inside the pipeline, where a corrupt record
  can be skipped and counted.
  """
  if not data_dir:
    raise ValueError(f'No TFDS data_dir for {dataset_name!r}: set config.data.data_dir to '
                     'the folder launch/prepare_data.py wrote.')
  # The project's builders first: several names clash with TFDS's own datasets. Any other
  # TFDS dataset prepared under data_dir is read as TFDS knows it.
  if dataset_name in builders.BUILDERS:
    builder = builders.get_builder(dataset_name, data_dir)
  else:
    builder = tfds.builder(dataset_name, data_dir=data_dir)
  host_split = tfds.even_splits(split, n=process_count)[process_index]
  image_keys = [k for k in IMAGE_KEYS if k in builder.info.features]
  dataset = builder.as_dataset(
      split=host_split, shuffle_files=shuffle_seed is not None,
      decoders={k: tfds.decode.SkipDecoding() for k in image_keys},
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False))
  return dataset, builder.info.splits[split].num_examples


def from_examples(examples: list[Features]) -> tf.data.Dataset:
  """An in-memory dataset from python examples in the builders' format (tests, benchmarks).

  Leaves whose first dimension varies between examples (captions, objects) become per-example
  tensors of that varying length; images should be encoded bytes (PNG/JPEG), as in TFDS.
  """
  if not examples:
    raise ValueError('from_examples needs at least one example.')
  flat = [jax.tree.flatten(ex, is_leaf=lambda x: not isinstance(x, dict)) for ex in examples]
  treedef = flat[0][1]
  columns = []
  for column in zip(*(leaves for leaves, _ in flat)):
    arrays = [np.asarray(v) for v in column]
    if arrays[0].dtype.kind in 'US':
      arrays = [a.astype(object) for a in arrays]
    if len({a.shape for a in arrays}) == 1:
      columns.append(np.stack(arrays))
    elif any(a.ndim == 0 for a in arrays) or len({a.shape[1:] for a in arrays}) != 1:
      raise ValueError('Every leaf must keep its shape across examples except for the first '
                       f'dimension; got shapes {sorted({a.shape for a in arrays})}.')
    else:
      columns.append(tf.RaggedTensor.from_row_lengths(np.concatenate(arrays),
                                                      [len(a) for a in arrays]))
  return tf.data.Dataset.from_tensor_slices(jax.tree.unflatten(treedef, columns))


def decode_images(example: Features) -> Features:
  """Decodes every encoded image feature to uint8 [H, W, 3]; raises on corrupt bytes."""
  example = dict(example)
  for key in IMAGE_KEYS:
    if key in example and example[key].dtype == tf.string:
      image = tf.io.decode_image(example[key], channels=3, expand_animations=False)
      image.set_shape([None, None, 3])
      example[key] = image
  return example


# ---------------------------------------------------------------------------- machinery


def _host_seed(seed: int, process_index: int, stream: int) -> tf.Tensor:
  return tf.constant([seed, process_index * 2 + stream], tf.int64)


def _padding_like(spec: Any) -> Any:
  def zeros(s: tf.TensorSpec) -> tf.Tensor:
    if not s.shape.is_fully_defined():
      raise ValueError(f'Eval padding needs static per-example shapes; got {s}. Pad this '
                       'feature to a fixed size in the example function.')
    return tf.zeros(s.shape, s.dtype)
  return tf.nest.map_structure(zeros, spec)


def build(source: tf.data.Dataset, example_fn: ExampleFn, batch_fn: BatchFn, *, train: bool,
          batch_size: int, seed: int, process_index: int, shuffle_buffer: int,
          prefetch: int = PREFETCH, eval_examples: int | None = None,
          autotune: bool = False) -> tf.data.Dataset:
  """The shared pipeline over this host's examples.

  Args:
    source: this host's examples (images may be encoded bytes).
    example_fn: (decoded example, seed [2]) -> features with static shapes.
    batch_fn: (batched features with `valid` [b], seed [2]) -> batch.
    train: shuffle + repeat forever, or one pass in a fixed order.
    batch_size: host-local batch size b.
    seed: base seed of the shuffle and of every random draw.
    process_index: folded into the seeds so that hosts draw differently.
    shuffle_buffer: examples held by the shuffle (train only).
    prefetch: batches prepared ahead of the consumer.
    eval_examples: eval only: examples per host after padding (a multiple of b, the same on
      every host so that all hosts run the same number of steps).
    autotune: tf.data's autotuning. Off, its parallel maps run one call per core. On, its
      model thread can hold the iterator's deletion (the end of a run) for up to a minute:
      seen as 13-48 s exits after the final checkpoint, the main thread waiting for
      `Model::OptimizeLoop` (TF 2.21); off, 2 s.

  Returns:
    A dataset of batches; each has `valid` [b] bool (false on eval padding) and
    `skipped_records` (int64 scalar: records skipped so far on this host).
  """
  dataset = source
  if train:
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat()
  example_seed = _host_seed(seed, process_index, _EXAMPLE_STREAM)
  batch_seed = _host_seed(seed, process_index, _BATCH_STREAM)
  parallel = tf.data.AUTOTUNE

  dataset = dataset.enumerate()
  dataset = dataset.map(plain_tf(lambda i, ex: (i, decode_images(ex))),
                        num_parallel_calls=parallel, deterministic=True)
  dataset = dataset.ignore_errors(log_warning=True)
  dataset = dataset.enumerate()

  @plain_tf
  def per_example(kept, indexed):
    index, example = indexed
    features = dict(example_fn(example, tf.random.experimental.stateless_fold_in(
        example_seed, index)))
    features['valid'] = tf.constant(True)
    features['skipped_records'] = index - kept
    return features

  dataset = dataset.map(per_example, num_parallel_calls=parallel, deterministic=True)
  if not train:
    if eval_examples is None or eval_examples % batch_size:
      raise ValueError(f'eval_examples={eval_examples} must be a multiple of the host batch '
                       f'size {batch_size}.')
    padding = tf.data.Dataset.from_tensors(_padding_like(dataset.element_spec)).repeat()
    dataset = dataset.concatenate(padding).take(eval_examples)

    @plain_tf
    def carry_count(count, features):  # padding keeps the count of the last real example
      count = tf.maximum(count, features['skipped_records'])
      return count, dict(features, skipped_records=count)

    dataset = dataset.scan(tf.constant(0, tf.int64), carry_count)
  # Batch-level steps run sequentially: each buffered batch is part of the iterator state, so
  # only the prefetch buffer holds whole batches (per-example work is the parallel part).
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset.enumerate()

  @plain_tf
  def per_batch(batch_index, batch):
    batch = dict(batch)
    skipped = tf.reduce_max(batch.pop('skipped_records'))
    out = dict(batch_fn(batch, tf.random.experimental.stateless_fold_in(
        batch_seed, batch_index)))
    out['skipped_records'] = skipped
    return out

  dataset = dataset.map(per_batch)
  dataset = dataset.prefetch(prefetch)
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.FAIL
  options.autotune.enabled = autotune
  return dataset.with_options(options)


def _eval_examples_per_host(num_examples: int, process_count: int, batch_size: int) -> int:
  """Per-host examples after padding: the largest host share rounded up to whole batches."""
  per_host = math.ceil(num_examples / process_count)
  return max(1, math.ceil(per_host / batch_size)) * batch_size


def _count(source: tf.data.Dataset) -> int:
  count = int(source.cardinality())
  if count == tf.data.INFINITE_CARDINALITY:
    raise ValueError('An eval source must be finite; it has infinite cardinality.')
  if count == tf.data.UNKNOWN_CARDINALITY:
    count = int(source.reduce(0, lambda n, _: n + 1))
  return count


def make_iterator(data_config: Any, example_fn: ExampleFn, batch_fn: BatchFn, *, split: str,
                  train: bool, global_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None, seed: int = 0,
                  source: tf.data.Dataset | None = None, dataset: str | None = None,
                  data_dir: str | None = None) -> DatasetIterator:
  """This host's batches of any task: its share of the split through `build`.

  Args:
    data_config: `config.data` (dataset, data_dir, shuffle_buffer, optional prefetch and
      tf_data_autotune).
    example_fn: the task's per-example features (see `build`).
    batch_fn: the task's per-batch features (see `build`).
    split: TFDS split name, e.g. 'train'.
    train: shuffled, augmented, endless; else one fixed pass padded to whole batches.
    global_batch_size: batch size over all hosts; each host yields global / process_count.
    process_index: this host (default jax.process_index()).
    process_count: number of hosts (default jax.process_count()).
    seed: seed of the shuffle and of every random draw.
    source: the whole split as a tf.data.Dataset in the builders' format, instead of loading
      it with TFDS (tests, benchmarks, custom data); sharded here with `Dataset.shard`.
    dataset: TFDS builder name; overrides `data_config.dataset`.
    data_dir: TFDS data dir; overrides `data_config.data_dir`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'Global batch size {global_batch_size} is not divisible by the '
                     f'{process_count} processes; change config.train.batch_size.')
  batch_size = global_batch_size // process_count
  if source is None:
    host_source, num_examples = load_split(
        dataset or data_config.dataset, split, data_dir=data_dir or data_config.data_dir,
        process_index=process_index, process_count=process_count,
        shuffle_seed=seed if train else None)
  else:
    num_examples = 0 if train else _count(source)
    host_source = source.shard(process_count, process_index)
  return DatasetIterator(build(
      host_source, example_fn, batch_fn, train=train, batch_size=batch_size, seed=seed,
      process_index=process_index, shuffle_buffer=int(data_config.shuffle_buffer),
      prefetch=int(data_config.get('prefetch', None) or PREFETCH),
      autotune=bool(data_config.get('tf_data_autotune', False)),
      eval_examples=None if train else _eval_examples_per_host(num_examples, process_count,
                                                               batch_size)))


# ----------------------------------------------------------------------------- features


def pad_rows(x: tf.Tensor, rows: int, value) -> tf.Tensor:
  """First `rows` rows of x [N, ...], padded with `value` to exactly [rows, ...]."""
  x = x[:rows]
  paddings = [[0, rows - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
  x = tf.pad(x, paddings, constant_values=tf.cast(value, x.dtype))
  x.set_shape([rows] + x.shape.as_list()[1:])
  return x


def max_attributes(data_config: Any) -> int:
  """K, the attributes per object in a batch: `config.data.max_attributes` or MAX_ATTRIBUTES."""
  return int(data_config.get('max_attributes', None) or MAX_ATTRIBUTES)


def _object_targets(objects: Features, keep: tf.Tensor, boxes: tf.Tensor, max_boxes: int,
                    num_attributes: int) -> Features:
  """Kept boxes, first `max_boxes`, padded: boxes [M, 4], labels/box_mask [M], attrs [M, K]."""
  index = tf.where(keep)[:, 0]
  count = tf.minimum(tf.size(index), max_boxes)
  labels = tf.cast(tf.gather(objects['label'], index), tf.int32)
  if 'attributes' in objects:
    attributes = tf.cast(tf.gather(objects['attributes'], index), tf.int32)
    attributes = tf.reshape(attributes, [tf.size(index), -1])[:, :num_attributes]
    attributes = tf.pad(attributes, [[0, 0], [0, num_attributes - tf.shape(attributes)[1]]],
                        constant_values=-1)
  else:
    attributes = -tf.ones([tf.size(index), num_attributes], tf.int32)
  attributes.set_shape([None, num_attributes])
  return {
      'boxes': pad_rows(tf.gather(boxes, index), max_boxes, 0.0),
      'labels': pad_rows(labels, max_boxes, -1),
      'attributes': pad_rows(attributes, max_boxes, -1),
      'box_mask': tf.range(max_boxes) < count,
  }


def encoder_text(tokenizer: Tokenizer, tokens: tf.RaggedTensor, max_len: int
                 ) -> tuple[tf.Tensor, tf.Tensor]:
  """[CLS] tokens [SEP] [PAD]...: ids [b, L] int32 and mask [b, L] bool from [b, (n)] ids."""
  tokens = tokens[:, :max_len - 2]
  rows = tokens.nrows(out_type=tf.int32)
  ids = tf.concat([tf.fill([rows, 1], tokenizer.cls_id), tokens,
                   tf.fill([rows, 1], tokenizer.sep_id)], axis=1)
  mask = tf.range(max_len)[None] < tf.cast(ids.row_lengths(), tf.int32)[:, None]
  return ids.to_tensor(default_value=tokenizer.pad_id, shape=[None, max_len]), mask


def decoder_text(tokenizer: Tokenizer, tokens: tf.RaggedTensor, max_len: int
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Teacher forcing from [b, (n)] ids: in [BOS] tokens, out tokens [EOS], mask; each [b, T]."""
  tokens = tokens[:, :max_len - 1]
  rows = tokens.nrows(out_type=tf.int32)
  caption_in = tf.concat([tf.fill([rows, 1], tokenizer.bos_id), tokens], axis=1)
  caption_out = tf.concat([tokens, tf.fill([rows, 1], tokenizer.eos_id)], axis=1)
  mask = tf.range(max_len)[None] < tf.cast(caption_in.row_lengths(), tf.int32)[:, None]
  pad = lambda r: r.to_tensor(default_value=tokenizer.pad_id, shape=[None, max_len])
  return pad(caption_in), pad(caption_out), mask


def itm_partners(image_ids: tf.Tensor, donors: tf.Tensor, candidates: tf.Tensor,
                 prob: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Picks, with probability `prob`, another image's row to take the text from.

  Args:
    image_ids: [b] int64.
    donors: [b] bool, rows whose caption may be given to another image.
    candidates: [b] bool, rows that may receive another image's caption.
    prob: negative probability.
    seed: [2] stateless seed.

  Returns:
    (source row [b] int32 of each row's encoder text, itm_label [b] int32: 1 matched, 0
    swapped). A donor is drawn uniformly among the rows of a different image id; a row with
    none stays matched.
  """
  seed_draw, seed_partner = tf.unstack(tf.random.split(seed, 2))
  rows = tf.shape(image_ids)[0]
  allowed = (image_ids[None, :] != image_ids[:, None]) & donors[None, :]  # [b, b]
  scores = tf.where(allowed, tf.random.stateless_uniform([rows, rows], seed_partner), -1.0)
  partner = tf.argmax(scores, axis=1, output_type=tf.int32)
  negative = (candidates & tf.reduce_any(allowed, axis=1)
              & (tf.random.stateless_uniform([rows], seed_draw) < prob))
  return tf.where(negative, partner, tf.range(rows)), 1 - tf.cast(negative, tf.int32)


# ----------------------------------------------------------------------------- pretrain


def pretrain_example_fn(data_config: Any, *, train: bool) -> ExampleFn:
  """Image, boxes and one of the image's captions (random in train, the first in eval)."""
  options = augment_lib.AugmentOptions.from_config(data_config)
  max_boxes = int(data_config.max_boxes)
  num_attributes = max_attributes(data_config)

  def fn(example: Features, seed: tf.Tensor) -> Features:
    seed_augment, seed_caption = tf.unstack(tf.random.split(seed, 2))
    objects = example['objects']
    out = augment_lib.augment(example['image'], objects['bbox'], example['captions'],
                              seed_augment, options, train=train)
    captions = out.pop('captions')
    count = tf.shape(captions)[0]
    pick = (tf.random.stateless_uniform([], seed_caption, 0, tf.maximum(count, 1), tf.int32)
            if train else 0)
    has_caption = count > 0
    caption = tf.cond(has_caption, lambda: captions[tf.minimum(pick, count - 1)],
                      lambda: tf.constant(''))
    features = {'image': out['image'], 'image_mask': out['image_mask'],
                'image_id': tf.cast(example['image/id'], tf.int64),
                'caption': caption, 'has_caption': has_caption}
    features.update(_object_targets(objects, out['box_keep'], out['boxes'], max_boxes,
                                    num_attributes))
    return features

  return fn


def pretrain_batch_fn(data_config: Any, tokenizer: Tokenizer) -> BatchFn:
  """ITM negatives, then encoder text (MLM-masked) and decoder caption from the own caption."""
  special_ids = sorted(set(int(i) for i in tokenizer.special_ids) | {tokenizer.pad_id})

  def fn(batch: Features, seed: tf.Tensor) -> Features:
    seed_itm, seed_mlm = tf.unstack(tf.random.split(seed, 2))
    batch = dict(batch)
    caption = batch.pop('caption')
    has_caption = batch.pop('has_caption')
    tokens = tokenizer.tokenize(caption)
    source_row, itm_label = itm_partners(batch['image_id'], batch['valid'] & has_caption,
                                         batch['valid'], data_config.itm_neg_prob, seed_itm)
    text_ids, text_mask = encoder_text(tokenizer, tf.gather(tokens, source_row),
                                       data_config.max_text_len)
    text_ids, mlm_labels = masking.mask_tokens(
        text_ids, seed_mlm, mlm_prob=data_config.mlm_prob, mask_id=tokenizer.mask_id,
        vocab_size=tokenizer.vocab_size, special_ids=special_ids)
    caption_in, caption_out, caption_mask = decoder_text(tokenizer, tokens,
                                                         data_config.max_caption_len)
    batch.update(text_ids=text_ids, text_mask=text_mask, mlm_labels=mlm_labels,
                 itm_label=itm_label, caption_in=caption_in, caption_out=caption_out,
                 caption_mask=caption_mask & has_caption[:, None])
    return batch

  return fn


def make_pretrain_dataset(data_config: Any, tokenizer: Tokenizer, *, split: str, train: bool,
                          global_batch_size: int, **kwargs) -> DatasetIterator:
  """Pre-training batches (MLM, ITM, detection, captioning) for this host.

  Args:
    data_config: `config.data`.
    tokenizer: the text tokenizer.
    split: TFDS split name.
    train: train (augmented, shuffled, endless) or eval (one padded pass) batches.
    global_batch_size: batch size over all hosts.
    **kwargs: process_index, process_count, seed, source, dataset, data_dir of
      `make_iterator`.

  Returns:
    An iterator of numpy batches: image [b, S, S, 3] f32, image_mask [b, S, S] bool,
    text_ids / text_mask / mlm_labels [b, L], itm_label [b], caption_in / caption_out /
    caption_mask [b, T], boxes [b, M, 4] f32 cxcywh, labels [b, M] i32 (-1 pad), attributes
    [b, M, K] i32 (-1 pad), box_mask [b, M], image_id [b] i64, valid [b] bool,
    skipped_records (int64 scalar).
  """
  return make_iterator(data_config, pretrain_example_fn(data_config, train=train),
                       pretrain_batch_fn(data_config, tokenizer), split=split, train=train,
                       global_batch_size=global_batch_size, **kwargs)
