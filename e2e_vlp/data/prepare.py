"""Which data a run reads: the embedded corpus (made on first use) or a prepared dataset."""

import dataclasses
import os

import ml_collections

from e2e_vlp.data import builders
from e2e_vlp.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DataSource:
  dataset: str  # TFDS builder name
  data_dir: str  # TFDS data dir holding it
  tokenizer: Tokenizer
  vocab_path: str  # the tokenizer's vocab.txt (copied into each workdir, for export)
  class_names: list[str]


def cache_dir(config: ml_collections.ConfigDict) -> str:
  return (config.cache_dir or os.environ.get('E2E_VLP_CACHE')
          or os.path.join(os.path.expanduser('~'), '.cache', 'e2e_vlp'))


def resolve(config: ml_collections.ConfigDict) -> DataSource:
  """Prepares the embedded corpus when asked for and not given; loads the tokenizer."""
  d = config.data
  if d.dataset.startswith('embedded') and not d.data_dir:
    data_dir, vocab = builders.prepare_embedded(
        cache_dir(config), num_train=d.corpus_train_images, num_val=d.corpus_val_images,
        seed=d.corpus_seed, image_size=d.corpus_image_size, vocab_size=config.model.vocab_size,
        datasets=(d.dataset,))
  else:
    if not d.data_dir:
      raise ValueError(f'config.data.data_dir is empty: prepare {d.dataset!r} with '
                       'launch/prepare_data.py and pass its --data_dir.')
    data_dir, vocab = d.data_dir, ''
  vocab = d.tokenizer or vocab
  if not vocab:
    raise ValueError('config.data.tokenizer is empty: give a vocab.txt (BERT, or one '
                     'learned with launch/train_tokenizer.py).')
  builder = builders.get_builder(d.dataset, data_dir)
  class_names = list((builder.info.metadata or {}).get('class_names', []))
  return DataSource(dataset=d.dataset, data_dir=data_dir,
                    tokenizer=Tokenizer.from_vocab_file(vocab), vocab_path=vocab,
                    class_names=class_names)
