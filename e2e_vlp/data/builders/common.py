"""What every builder shares: the image-text feature contract, file lookup, counting.

Builders skip TFDS's global registration (`skip_registration=True`): several of their
names (coco_captions, ...) belong to TFDS's own datasets, and a second import of a
registered class would fail. Build and load them through `e2e_vlp.data.builders`.
"""

import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from e2e_vlp.data import records

VERSION = tfds.core.Version('1.0.0')
RELEASE_NOTES = {'1.0.0': 'First release.'}
MAX_ATTRIBUTES = 4  # attribute ids per object, padded with -1
Example = tuple[Any, dict[str, Any]]


def image_feature() -> tfds.features.Image:
  return tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg')


def image_text_features() -> tfds.features.FeaturesDict:
  """The contract of every image-text builder (empty sequences where data has none)."""
  return tfds.features.FeaturesDict({
      'image/id': np.int64,
      'image/filename': tfds.features.Text(),
      'image': image_feature(),
      'captions': tfds.features.Sequence(tfds.features.Text()),
      'objects': tfds.features.Sequence({
          'bbox': tfds.features.BBoxFeature(),  # [ymin, xmin, ymax, xmax] in [0, 1]
          'label': np.int64,  # index into metadata['class_names']
          'attributes': tfds.features.Tensor(shape=(MAX_ATTRIBUTES,), dtype=np.int64),
      }),
  })


def objects(boxes: Sequence[Sequence[float]], labels: Sequence[int],
            attributes: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
  """The 'objects' feature value; attribute lists are cut or padded to MAX_ATTRIBUTES."""
  padded = [(list(a) + [-1] * MAX_ATTRIBUTES)[:MAX_ATTRIBUTES] for a in attributes]
  return {
      'bbox': np.asarray(boxes, np.float32).reshape(-1, 4),
      'label': np.asarray(labels, np.int64),
      'attributes': np.asarray(padded, np.int64).reshape(-1, MAX_ATTRIBUTES),
  }


def image_text_example(image_id: int, filename: str, image: bytes, captions: Sequence[str],
                       objs: dict[str, np.ndarray]) -> dict[str, Any]:
  return {'image/id': image_id, 'image/filename': filename, 'image': image,
          'captions': list(captions), 'objects': objs}


def find_file(root: epath.Path, candidates: Iterable[str]) -> epath.Path | None:
  """The first existing path among root/candidate."""
  for c in candidates:
    if (root / c).exists():
      return root / c
  return None


def read_json(path: epath.Path) -> Any:
  with path.open('rb') as f:
    return json.load(f)


def top_k(counts: dict[str, int], k: int) -> list[str]:
  """The k most frequent keys; ties by key so the vocabulary is deterministic."""
  return [key for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder over files the user placed in `manual_dir`, with a metadata dict."""

  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES
  # Where the files sit under manual_dir (the embedded corpus nests some datasets).
  MANUAL_SUBDIR = ''
  DESCRIPTION = ''
  HOMEPAGE = ''

  def _features(self) -> tfds.features.FeaturesDict:
    return image_text_features()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=self._features(),
        homepage=self.HOMEPAGE, metadata=tfds.core.MetadataDict())

  def _root(self, dl_manager: tfds.download.DownloadManager) -> epath.Path:
    root = dl_manager.manual_dir
    if self.MANUAL_SUBDIR:
      root = root / self.MANUAL_SUBDIR
    if not root.exists():
      raise FileNotFoundError(f'{root} does not exist. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return root

  def _generate_examples(self, split: str,
                         examples: Callable[[records.SkipCounter], Iterator[Example]]):
    """Yields `examples(counter)`, then logs the split's bad-input summary.

    The counts are also kept in metadata['bad_input'][split]. Raises
    records.AllRecordsSkippedError when nothing was yielded.
    """
    counter = records.SkipCounter(f'{self.name}/{split}')
    num = 0
    for example in examples(counter):
      num += 1
      yield example
    self.info.metadata.setdefault('bad_input', {})[split] = counter.counts
    counter.finish(num)


def _metadata(builder_or_dir: tfds.core.DatasetBuilder | str | os.PathLike, key: str) -> Any:
  """metadata[key] of a builder or of a prepared dataset version directory."""
  if isinstance(builder_or_dir, tfds.core.DatasetBuilder):
    where = builder_or_dir.data_dir
    metadata = dict(builder_or_dir.info.metadata or {})
  else:
    where = epath.Path(builder_or_dir)
    if not (where / 'metadata.json').exists():
      raise FileNotFoundError(f'{where / "metadata.json"} not found: pass a prepared dataset '
                              'version directory (<data_dir>/<name>[/<config>]/<version>) or '
                              'its builder.')
    metadata = read_json(where / 'metadata.json')
  if key not in metadata:
    raise KeyError(f'The dataset at {where} has no {key!r} in its metadata: is it prepared, and '
                   'is it a dataset that has them?')
  return metadata[key]


def load_class_names(builder_or_dir: tfds.core.DatasetBuilder | str | os.PathLike) -> list[str]:
  """Object class names, indexed by the 'objects/label' feature."""
  return list(_metadata(builder_or_dir, 'class_names'))


def load_attribute_names(builder_or_dir: tfds.core.DatasetBuilder | str | os.PathLike
                         ) -> list[str]:
  """Attribute names, indexed by the 'objects/attributes' feature."""
  return list(_metadata(builder_or_dir, 'attribute_names'))


def load_answer_vocab(builder_or_dir: tfds.core.DatasetBuilder | str | os.PathLike
                      ) -> list[str]:
  """VQA answers, indexed by the 'answer/ids' feature."""
  return list(_metadata(builder_or_dir, 'answers'))
