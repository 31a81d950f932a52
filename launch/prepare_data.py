r"""Builds one dataset into TFDS shards from its raw files.

  python launch/prepare_data.py --dataset embedded           # generates the corpus first
  python launch/prepare_data.py --dataset embedded_vqa
  python launch/prepare_data.py --dataset coco_captions --manual_dir ~/raw/coco \
      --data_dir ~/tensorflow_datasets
  python launch/prepare_data.py --dataset coco_karpathy --manual_dir ~/raw/coco \
      --data_dir ~/tensorflow_datasets     # dataset_coco.json + train2014/ val2014/
  python launch/prepare_data.py --dataset visual_genome --manual_dir ~/raw/vg \
      --data_dir ~/tensorflow_datasets --num_classes 1600 --num_attributes 400

The embedded datasets with no --manual_dir are generated into and built under
--cache_dir (default $E2E_VLP_CACHE or ~/.cache/e2e_vlp), as the trainer does on first
use. Re-running is a no-op for what is already built.
"""

import _bootstrap  # pylint: disable=unused-import,g-bad-import-order

import os

from absl import app
from absl import flags
from absl import logging

from configs import pretrain
from e2e_vlp.data import builders
from e2e_vlp.data.builders import visual_genome, vqa_v2

_TINY_DATA = pretrain.data_config('tiny')
_TINY_MODEL = pretrain.model_config('tiny')

flags.DEFINE_enum('dataset', None, sorted(builders.BUILDERS), 'The dataset to build.')
flags.DEFINE_string('manual_dir', None, 'Folder with the raw files in their published layout.')
flags.DEFINE_string('data_dir', None, 'TFDS data directory to write into.')
flags.DEFINE_string('cache_dir', None, 'Cache of the embedded corpus; default $E2E_VLP_CACHE '
                    'or ~/.cache/e2e_vlp.')
flags.DEFINE_integer('num_train', _TINY_DATA.corpus_train_images, 'Embedded corpus: train images.')
flags.DEFINE_integer('num_val', _TINY_DATA.corpus_val_images, 'Embedded corpus: val images.')
flags.DEFINE_integer('seed', _TINY_DATA.seed, 'Embedded corpus: generation seed.')
flags.DEFINE_integer('image_size', _TINY_DATA.image_size, 'Embedded corpus: image side (px).')
flags.DEFINE_integer('vocab_size', _TINY_MODEL.vocab_size,
                     'Embedded corpus: size of the learned WordPiece vocabulary.')
flags.DEFINE_integer('num_answers', vqa_v2.VqaConfig.num_answers, 'VQA: answer vocabulary size.')
flags.DEFINE_integer('num_classes', visual_genome.VisualGenomeConfig.num_classes,
                     'Visual Genome: object classes kept.')
flags.DEFINE_integer('num_attributes', visual_genome.VisualGenomeConfig.num_attributes,
                     'Visual Genome: attributes kept.')
flags.DEFINE_integer('val_every', visual_genome.VisualGenomeConfig.val_every,
                     'Visual Genome: image ids divisible by this form the val split.')
flags.mark_flag_as_required('dataset')


def default_cache_dir() -> str:
  return os.environ.get('E2E_VLP_CACHE') or os.path.expanduser('~/.cache/e2e_vlp')


def _builder_config(name: str, f: flags.FlagValues):
  """The default config, or a custom one named after its values when flags change it."""
  if issubclass(builders.BUILDERS[name], vqa_v2.VqaV2):
    if f.num_answers == vqa_v2.VqaConfig.num_answers:
      return None
    return vqa_v2.VqaConfig(name=f'top{f.num_answers}', num_answers=f.num_answers)
  if issubclass(builders.BUILDERS[name], visual_genome.VisualGenome):
    custom = visual_genome.VisualGenomeConfig(
        name=f'top{f.num_classes}_{f.num_attributes}_val{f.val_every}',
        num_classes=f.num_classes, num_attributes=f.num_attributes, val_every=f.val_every)
    return None if custom == visual_genome.VisualGenomeConfig(name=custom.name) else custom
  return None


def main(argv):
  del argv
  f = flags.FLAGS
  if f.dataset.startswith('embedded') and not f.manual_dir:
    data_dir, vocab = builders.prepare_embedded(
        f.cache_dir or default_cache_dir(), num_train=f.num_train, num_val=f.num_val,
        seed=f.seed, image_size=f.image_size, vocab_size=f.vocab_size, datasets=(f.dataset,),
        data_dir=f.data_dir)
    logging.info('Built %s under %s; tokenizer vocabulary %s.', f.dataset, data_dir, vocab)
    return
  if not f.manual_dir or not f.data_dir:
    raise app.UsageError(f'--dataset {f.dataset} needs --manual_dir and --data_dir.')
  builder = builders.build(f.dataset, os.path.expanduser(f.manual_dir),
                           os.path.expanduser(f.data_dir), _builder_config(f.dataset, f))
  logging.info('Built %s at %s: %s', f.dataset, builder.data_dir, builder.info.splits)


if __name__ == '__main__':
  app.run(main)
