"""COCO captions in Karpathy's splits (`dataset_coco.json`): the captioning benchmark.

The same format as Flickr30K's file (read by `flickr30k.Flickr30k`): each image has a
`filepath` (train2014 / val2014), a `filename`, its `cocoid` (the example's image id, so
results match the official COCO ids) and a `split`: 113,287 train images (train + restval),
5,000 val and 5,000 test, all with their reference captions (five for nearly every image).
Images sit under `train2014/` and `val2014/` (or `images/train2014/`, ...), as released.
"""

from etils import epath

from e2e_vlp.data.builders import common, flickr30k

_COCO_FOLDERS = ('train2014', 'val2014')


class CocoKarpathy(flickr30k.Flickr30k, skip_registration=True):
  """COCO 2014 images with all their captions, Karpathy train / val / test splits."""

  name = 'coco_karpathy'
  KARPATHY_JSON = 'dataset_coco.json'
  HOMEPAGE = 'https://cs.stanford.edu/people/karpathy/deepimagesent/'
  DESCRIPTION = 'COCO 2014 images and captions in the Karpathy splits (captioning protocol).'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place dataset_coco.json (Karpathy splits, from caption_datasets.zip) in manual_dir '
      'and the COCO 2014 images in manual_dir/train2014/ and manual_dir/val2014/.')

  def _image_path(self, root: epath.Path, image: dict) -> epath.Path:
    """The image under <filepath>/ or images/<filepath>/ (both 2014 folders if none given).

    The first candidate when none exists: the reader then counts it as missing.
    """
    folders = [image['filepath']] if image.get('filepath') else list(_COCO_FOLDERS)
    candidates = [f'{prefix}{folder}/{image["filename"]}'
                  for folder in folders for prefix in ('', 'images/')]
    return common.find_file(root, candidates) or root / candidates[0]
