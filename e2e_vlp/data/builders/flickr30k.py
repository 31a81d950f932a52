"""Flickr30K retrieval with Karpathy's splits (`dataset_flickr30k.json`).

Karpathy's JSON lists images with `filename`, `split` (train / restval / val / test;
restval joins train, as is usual) and `sentences[].raw` (the captions kept; `tokens` are
his lower-cased tokenisation, which pycocoevalcap would redo anyway); COCO-style files also
have `filepath` (the image folder) and `cocoid`. Images sit under `flickr30k-images/`.
`Flickr30k` reads any file of this format: coco_karpathy and embedded_retrieval subclass it.
"""

from typing import Iterator

import tensorflow_datasets as tfds
from etils import epath

from e2e_vlp.data import records
from e2e_vlp.data.builders import common

_SPLITS = {'train': 'train', 'restval': 'train', 'val': 'val', 'test': 'test'}


class Flickr30k(common.ManualBuilder, skip_registration=True):
  """Images with their five captions, Karpathy train / val / test splits."""

  name = 'flickr30k'
  KARPATHY_JSON = 'dataset_flickr30k.json'
  IMAGE_DIR = 'flickr30k-images'
  HOMEPAGE = 'https://shannon.cs.illinois.edu/DenotationGraph/'
  DESCRIPTION = 'Flickr30K images and captions in the Karpathy retrieval splits.'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place dataset_flickr30k.json (Karpathy splits) in manual_dir and the images in '
      'manual_dir/flickr30k-images/.')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._root(dl_manager)
    path = common.find_file(root, [self.KARPATHY_JSON, f'annotations/{self.KARPATHY_JSON}'])
    if path is None:
      raise FileNotFoundError(f'{self.KARPATHY_JSON} not found under {root}. '
                              f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    images = common.read_json(path)['images']
    self.info.metadata['class_names'] = []
    self.info.metadata['attribute_names'] = []
    splits = sorted({_SPLITS[im.get('split')] for im in images if im.get('split') in _SPLITS})
    return {split: self._generate_examples(
        split, lambda counter, split=split: self._examples(root, images, split, counter))
            for split in splits}

  def _examples(self, root: epath.Path, images: list[dict], split: str,
                counter: records.SkipCounter) -> Iterator[common.Example]:
    for im in images:
      if _SPLITS.get(im.get('split')) != split:
        continue
      filename = im['filename']
      stem = filename.rsplit('.', 1)[0]
      image_id = im.get('cocoid', int(stem) if stem.isdigit() else im['imgid'])
      captions = [c for s in im.get('sentences', [])
                  if (c := records.clean_caption(s.get('raw'), counter)) is not None]
      if not captions:
        counter.count('no_captions')
        continue
      loaded = records.load_rgb_jpeg(self._image_path(root, im), counter)
      if loaded is None:
        continue
      yield image_id, common.image_text_example(
          image_id, filename, loaded[0], captions, common.objects([], [], []))

  def _image_path(self, root: epath.Path, image: dict) -> epath.Path:
    """Where the image of a Karpathy entry is (the path need not exist)."""
    return root / image.get('filepath', self.IMAGE_DIR) / image['filename']
