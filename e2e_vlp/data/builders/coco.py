"""The COCO reader shared by coco_captions, coco_instances and embedded.

Reads `annotations/captions_{split}{year}.json` and/or `instances_{split}{year}.json`
(2014 or 2017) with images under `{split}{year}/`, one example per image. Supports the
documented extension of the embedded corpus: per-annotation `attribute_ids` and a
top-level `attributes` list of `{id, name}`.
"""

import collections
from typing import Any, Iterator

import tensorflow_datasets as tfds
from etils import epath

from e2e_vlp.data import records
from e2e_vlp.data.builders import common

SPLITS = ('train', 'val')
_YEARS = ('2014', '2017')


def _annotation_file(root: epath.Path, kind: str, split: str, year: str) -> epath.Path | None:
  name = f'{kind}_{split}{year}.json'
  return common.find_file(root, [f'annotations/{name}', name])


def _vocabulary(entries: list[dict[str, Any]]) -> tuple[list[str], dict[int, int]]:
  """Names sorted by id, and id -> contiguous index."""
  entries = sorted(entries, key=lambda e: e['id'])
  return [e['name'] for e in entries], {e['id']: i for i, e in enumerate(entries)}


class CocoBuilder(common.ManualBuilder, skip_registration=True):
  """Base of the COCO-format builders; subclasses choose which annotations to read."""

  USE_CAPTIONS = True
  USE_INSTANCES = False
  HOMEPAGE = 'https://cocodataset.org'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place the COCO files in manual_dir: annotations/captions_{train,val}2014.json and/or '
      'annotations/instances_{train,val}2014.json (2017 works too), and the images in '
      'train2014/ and val2014/.')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._root(dl_manager)
    kinds = ['captions'] * self.USE_CAPTIONS + ['instances'] * self.USE_INSTANCES
    found = {}
    for split in SPLITS:
      for year in _YEARS:
        files = {k: _annotation_file(root, k, split, year) for k in kinds}
        if all(files.values()):
          found[split] = (year, files)
          break
    if not found:
      raise FileNotFoundError(
          f'No {" + ".join(kinds)} annotation file for any of {SPLITS} under {root}. '
          f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    class_names, category_index, attribute_names, attribute_index = [], {}, [], {}
    if self.USE_INSTANCES:  # vocabularies from the first split: the same for all splits
      first = common.read_json(next(iter(found.values()))[1]['instances'])
      class_names, category_index = _vocabulary(first.get('categories', []))
      attribute_names, attribute_index = _vocabulary(first.get('attributes', []))
    self.info.metadata['class_names'] = class_names
    self.info.metadata['attribute_names'] = attribute_names
    return {
        split: self._generate_examples(
            split,
            lambda counter, split=split, year=year, files=files: self._examples(
                root, f'{split}{year}', files, category_index, attribute_index, counter))
        for split, (year, files) in found.items()
    }

  def _examples(self, root: epath.Path, image_dir: str, files: dict[str, epath.Path],
                category_index: dict[int, int], attribute_index: dict[int, int],
                counter: records.SkipCounter) -> Iterator[common.Example]:
    images: dict[int, dict[str, Any]] = {}
    captions = collections.defaultdict(list)
    annotations = collections.defaultdict(list)
    data = {kind: common.read_json(path) for kind, path in files.items()}
    for d in data.values():
      for image in d.get('images', []):
        images.setdefault(image['id'], image)
    for ann in data.get('captions', {}).get('annotations', []):
      if ann.get('image_id') not in images:
        counter.count('unknown_image')
      elif (caption := records.clean_caption(ann.get('caption'), counter)) is not None:
        captions[ann['image_id']].append(caption)
    for ann in data.get('instances', {}).get('annotations', []):
      if ann.get('image_id') not in images:
        counter.count('unknown_image')
      elif ann.get('category_id') not in category_index:
        counter.count('unknown_category')
      elif ann.get('iscrowd', 0):
        counter.count('crowd_box')  # DETR trains on non-crowd boxes only
      else:
        annotations[ann['image_id']].append(ann)
    del data
    for image_id in sorted(images):
      if self.USE_CAPTIONS and not captions[image_id]:
        counter.count('no_captions')
        continue
      file_name = images[image_id]['file_name']
      path = common.find_file(root, [f'{image_dir}/{file_name}', f'images/{image_dir}/{file_name}'])
      loaded = records.load_rgb_jpeg(path or root / image_dir / file_name, counter)
      if loaded is None:
        continue
      jpeg, width, height = loaded
      boxes, labels, attributes = [], [], []
      for ann in annotations[image_id]:
        box = records.xywh_to_bbox(ann.get('bbox', ()), width, height, counter)
        if box is None:
          continue
        attrs = [a for a in ann.get('attribute_ids', []) if a in attribute_index]
        counter.count('unknown_attribute', len(ann.get('attribute_ids', [])) - len(attrs))
        boxes.append(box)
        labels.append(category_index[ann['category_id']])
        attributes.append([attribute_index[a] for a in attrs])
      yield image_id, common.image_text_example(
          image_id, file_name, jpeg, captions[image_id], common.objects(boxes, labels, attributes))
