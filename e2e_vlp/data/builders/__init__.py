"""TFDS builders, one per dataset, and the functions to build and load them.

Every builder reads files the user placed in a `manual_dir` (their published formats)
and writes TFDS shards under `data_dir/<name>[/<config>]/<version>`.
"""

import os
import shutil
import socket
import tempfile
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging

from e2e_vlp.data import corpus, tokenizer
from e2e_vlp.data.builders import (coco_captions, coco_instances, coco_karpathy, embedded,
                                   flickr30k, nlvr2, visual_genome, vqa_v2)
from e2e_vlp.data.builders.common import (MAX_ATTRIBUTES, load_answer_vocab,
                                          load_attribute_names, load_class_names)

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    cls.name: cls for cls in (
        coco_captions.CocoCaptions, coco_instances.CocoInstances, coco_karpathy.CocoKarpathy,
        visual_genome.VisualGenome, vqa_v2.VqaV2, nlvr2.Nlvr2, flickr30k.Flickr30k,
        embedded.Embedded, embedded.EmbeddedVqa, embedded.EmbeddedNlvr2,
        embedded.EmbeddedRetrieval)
}


def get_builder(name: str, data_dir: str | os.PathLike,
                config: Any = None) -> tfds.core.GeneratorBasedBuilder:
  """The builder `name` over `data_dir` (reads a prepared dataset, or prepares one).

  Args:
    name: a key of BUILDERS.
    data_dir: the TFDS data directory.
    config: a BuilderConfig (e.g. VisualGenomeConfig(name='top100', num_classes=100)),
      a config name, or None for the builder's default.
  """
  if name not in BUILDERS:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {sorted(BUILDERS)}.')
  return BUILDERS[name](data_dir=os.fspath(data_dir), config=config)


def build(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
          config: Any = None) -> tfds.core.GeneratorBasedBuilder:
  """Prepares dataset `name` from the raw files in `manual_dir`; a no-op when prepared.

  TFDS writes into a temporary folder and renames it at the end, so an interrupted
  build never leaves a dataset that looks complete.
  """
  builder = get_builder(name, data_dir, config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return builder


def _corpus_key(num_train: int, num_val: int, seed: int, image_size: int) -> str:
  return f'embedded_v{corpus.VERSION}_{num_train}_{num_val}_seed{seed}_px{image_size}'


def _generate_corpus_once(raw_dir: str, **kwargs: Any) -> None:
  """Generates the corpus into a temporary sibling and renames it into place.

  A folder at `raw_dir` is therefore always complete. A killed run leaves its hidden
  `.<name>.tmp-<host>-<pid>-*` folder behind; the next call on that host removes it.
  """
  if os.path.isdir(raw_dir):
    return
  parent = os.path.dirname(raw_dir)
  os.makedirs(parent, exist_ok=True)
  prefix = _temp_prefix(os.path.basename(raw_dir))
  _remove_orphaned_temps(parent, prefix)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'{prefix}{os.getpid()}-')
  try:
    corpus.generate(tmp, **kwargs)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    os.rename(tmp, raw_dir)
  except OSError:
    if not os.path.isdir(raw_dir):  # not a concurrent winner's rename: a real failure
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _temp_prefix(name: str) -> str:
  """This host's prefix for the temporary siblings of folder `name`; the pid follows."""
  return f'.{name}.tmp-{socket.gethostname()}-'


def _remove_orphaned_temps(parent: str, prefix: str) -> None:
  """Removes the folders `<prefix><pid>-*` in `parent` whose process is gone.

  A folder whose process still runs (a concurrent generation) or that another host made
  (a shared file system: its process cannot be checked from here) is left alone.
  """
  removed = 0
  for entry in os.listdir(parent):
    pid = entry[len(prefix):].split('-', 1)[0] if entry.startswith(prefix) else ''
    if pid.isdigit() and not _process_alive(int(pid)):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
      removed += 1
  if removed:
    logging.warning('Removed %d unfinished corpus folder(s) of killed runs from %s.', removed,
                    parent)


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    pass
  return True


def prepare_embedded(cache_dir: str | os.PathLike, *, num_train: int, num_val: int, seed: int,
                     image_size: int = 96, vocab_size: int = 512,
                     datasets: Sequence[str] = ('embedded',),
                     data_dir: str | os.PathLike | None = None) -> tuple[str, str]:
  """Generates (once) the embedded corpus, builds its datasets and learns its vocabulary.

  Idempotent: each step reuses what an earlier call left in `cache_dir`, and each
  writes atomically. Layout, with key = embedded_v<version>_<train>_<val>_seed<seed>_px<size>:
  raw/<key>/ (the corpus), tfds/<key>/ (TFDS data_dir), tokenizer/<key>_vocab<N>_bpe/.

  Returns:
    (TFDS data_dir, path of the vocab.txt learned on the training captions).
  """
  cache_dir = os.fspath(cache_dir)
  key = _corpus_key(num_train, num_val, seed, image_size)
  raw_dir = os.path.join(cache_dir, 'raw', key)
  _generate_corpus_once(raw_dir, num_train=num_train, num_val=num_val, seed=seed,
                        image_size=image_size)
  data_dir = os.fspath(data_dir) if data_dir else os.path.join(cache_dir, 'tfds', key)
  for name in datasets:
    if not name.startswith('embedded'):
      raise ValueError(f'{name!r} is not an embedded-corpus dataset.')
    build(name, raw_dir, data_dir)
  tokenizer_dir = os.path.join(cache_dir, 'tokenizer', f'{key}_vocab{vocab_size}_bpe')
  captions = os.path.join(raw_dir, 'annotations', 'captions_train2014.json')
  tokenizer.default_tokenizer(tokenizer_dir, _lazy(tokenizer.load_captions, captions), vocab_size)
  return data_dir, os.path.join(tokenizer_dir, 'vocab.txt')


def _lazy(fn, *args) -> Iterator[str]:
  """An iterator that calls fn(*args) only when first advanced."""
  yield from fn(*args)
