"""COCO Captions 2014/2017: one example per image with all its captions, no objects."""

from e2e_vlp.data.builders import coco


class CocoCaptions(coco.CocoBuilder, skip_registration=True):
  """COCO images with their captions."""

  name = 'coco_captions'
  USE_CAPTIONS = True
  USE_INSTANCES = False
  DESCRIPTION = 'COCO images with all their captions (objects left empty).'
