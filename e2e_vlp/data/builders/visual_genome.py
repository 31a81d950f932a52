"""Visual Genome objects and attributes, with vocabularies computed from the data.

Reads `image_data.json` (image ids, sizes, urls), `objects.json` (boxes `x, y, w, h`
in pixels with `names`) and optionally `attributes.json` (per-object `attributes`);
images sit in `VG_100K/` or `VG_100K_2/` as `<image_id>.jpg`. Class and attribute
vocabularies are the most frequent lower-cased names (1,600 / 400 by default, as in
bottom-up attention); objects outside the class vocabulary are dropped. VG has no
official split: images whose id is a multiple of `val_every` form 'val'.
"""

import collections
import dataclasses
from typing import Any, Iterator

import tensorflow_datasets as tfds
from etils import epath

from e2e_vlp.data import records
from e2e_vlp.data.builders import common

_IMAGE_DIRS = ('VG_100K', 'VG_100K_2', 'images')


@dataclasses.dataclass(eq=False)
class VisualGenomeConfig(tfds.core.BuilderConfig):
  num_classes: int = 1600
  num_attributes: int = 400
  val_every: int = 100


def _name(obj: dict[str, Any]) -> str | None:
  names = obj.get('names') or ([obj['name']] if obj.get('name') else [])
  name = names[0].strip().lower() if names and isinstance(names[0], str) else ''
  return name or None


class VisualGenome(common.ManualBuilder, skip_registration=True):
  """Visual Genome images with object boxes, classes and attributes (no captions)."""

  name = 'visual_genome'
  BUILDER_CONFIGS = [VisualGenomeConfig(name='top1600_400')]
  HOMEPAGE = 'https://homes.cs.washington.edu/~ranjay/visualgenome/'
  DESCRIPTION = 'Visual Genome objects with the top-K classes and attributes.'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place image_data.json, objects.json and attributes.json of Visual Genome in manual_dir '
      'and the images in VG_100K/ and VG_100K_2/.')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._root(dl_manager)
    if not (root / 'image_data.json').exists() or not (root / 'objects.json').exists():
      raise FileNotFoundError(f'image_data.json / objects.json not found under {root}. '
                              f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    config = self.builder_config
    images = {im.get('image_id', im.get('id')): im
              for im in common.read_json(root / 'image_data.json')}
    objects = {entry.get('image_id', entry.get('id')): entry.get('objects', [])
               for entry in common.read_json(root / 'objects.json')}
    attributes: dict[int, list[str]] = {}
    if (root / 'attributes.json').exists():
      for entry in common.read_json(root / 'attributes.json'):
        for obj in entry.get('attributes') or []:
          attributes[obj['object_id']] = [a.strip().lower() for a in obj.get('attributes') or []
                                          if isinstance(a, str) and a.strip()]
    class_counts = collections.Counter(n for objs in objects.values() for o in objs
                                       if (n := _name(o)) is not None)
    attribute_counts = collections.Counter(a for attrs in attributes.values() for a in attrs)
    class_names = common.top_k(class_counts, config.num_classes)
    attribute_names = common.top_k(attribute_counts, config.num_attributes)
    self.info.metadata['class_names'] = class_names
    self.info.metadata['attribute_names'] = attribute_names
    vocab = ({n: i for i, n in enumerate(class_names)},
             {n: i for i, n in enumerate(attribute_names)})
    ids = {'train': sorted(i for i in images if i % config.val_every),
           'val': sorted(i for i in images if i % config.val_every == 0)}
    return {split: self._generate_examples(
        split, lambda counter, split=split: self._examples(
            root, ids[split], images, objects, attributes, vocab, counter))
            for split in ids if ids[split]}

  def _examples(self, root: epath.Path, ids: list[int], images: dict[int, dict],
                objects: dict[int, list[dict]], attributes: dict[int, list[str]],
                vocab: tuple[dict[str, int], dict[str, int]],
                counter: records.SkipCounter) -> Iterator[common.Example]:
    class_index, attribute_index = vocab
    for image_id in ids:
      url_parts = str(images[image_id].get('url', '')).split('/')
      candidates = ['/'.join(url_parts[-2:])] if len(url_parts) >= 2 else []
      candidates += [f'{d}/{image_id}.jpg' for d in _IMAGE_DIRS]
      path = common.find_file(root, candidates)
      loaded = records.load_rgb_jpeg(path or root / f'VG_100K/{image_id}.jpg', counter)
      if loaded is None:
        continue
      jpeg, width, height = loaded
      boxes, labels, attrs = [], [], []
      for obj in objects.get(image_id, []):
        name = _name(obj)
        if name not in class_index:
          counter.count('rare_class' if name else 'unnamed_object')
          continue
        box = records.xywh_to_bbox([obj.get(k) for k in 'xywh'], width, height, counter)
        if box is None:
          continue
        boxes.append(box)
        labels.append(class_index[name])
        attrs.append([attribute_index[a] for a in attributes.get(obj.get('object_id'), [])
                      if a in attribute_index])
      filename = path.name if path is not None else f'{image_id}.jpg'
      yield image_id, common.image_text_example(
          image_id, filename, jpeg, [], common.objects(boxes, labels, attrs))
