"""NLVR2: a statement about a pair of images, true or false.

Reads `{train,dev,test1}.json` (JSON lines with identifier, sentence, label "True" /
"False", and for train a `directory`) and the images `<split>/<directory>/<id>-img0.png`
(or under images/), where <id> is the identifier without its last `-<n>` part.
"""

import json
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from e2e_vlp.data import records
from e2e_vlp.data.builders import common

# split -> file stem (and image folder) of the published release.
SPLITS = {'train': 'train', 'val': 'dev', 'test': 'test1'}
_LABELS = {'true': 1, 'false': 0}


def _label(value: Any) -> int | None:
  if isinstance(value, bool):
    return int(value)
  return _LABELS.get(str(value).strip().lower())


class Nlvr2(common.ManualBuilder, skip_registration=True):
  """NLVR2 statements on image pairs (label 1 = True)."""

  name = 'nlvr2'
  HOMEPAGE = 'https://lil.nlp.cornell.edu/nlvr/'
  DESCRIPTION = 'NLVR2: is a statement about two images true?'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place train.json, dev.json (test1.json) of NLVR2 in manual_dir and the images in '
      'images/train/<directory>/, images/dev/ (images/test1/) or train/, dev/, test1/.')

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        'id': tfds.features.Text(),
        'image0': common.image_feature(),
        'image1': common.image_feature(),
        'sentence': tfds.features.Text(),
        'label': np.int64,
    })

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._root(dl_manager)
    found = {split: root / f'{stem}.json' for split, stem in SPLITS.items()
             if (root / f'{stem}.json').exists()}
    if not found:
      raise FileNotFoundError(f'No NLVR2 split file under {root}. '
                              f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return {split: self._generate_examples(
        split, lambda counter, split=split, path=path: self._examples(
            root, SPLITS[split], path, counter)) for split, path in found.items()}

  def _examples(self, root: epath.Path, stem: str, path: epath.Path,
                counter: records.SkipCounter) -> Iterator[common.Example]:
    with path.open() as f:
      lines = [line for line in f if line.strip()]
    for line in lines:
      try:
        item = json.loads(line)
      except ValueError:
        counter.count('bad_json_line')
        continue
      label = _label(item.get('label'))
      identifier = item.get('identifier')
      if label is None or not isinstance(identifier, str):
        counter.count('bad_label' if label is None else 'bad_identifier')
        continue
      sentence = records.clean_caption(item.get('sentence'), counter)
      if sentence is None:
        continue
      base = identifier.rsplit('-', 1)[0]
      directory = str(item.get('directory', ''))
      images = []
      for k in (0, 1):
        name = f'{base}-img{k}.png'
        folders = [f'images/{stem}/{directory}', f'{stem}/{directory}', f'images/{stem}', stem]
        found = common.find_file(root, [f'{d.rstrip("/")}/{name}' for d in folders])
        images.append(records.load_rgb_jpeg(found or root / stem / name, counter))
      if None in images:
        continue
      yield identifier, {'id': identifier, 'image0': images[0][0], 'image1': images[1][0],
                         'sentence': sentence, 'label': label}
