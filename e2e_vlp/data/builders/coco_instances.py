"""COCO Instances 2014/2017: one example per image with its (non-crowd) boxes."""

from e2e_vlp.data.builders import coco


class CocoInstances(coco.CocoBuilder, skip_registration=True):
  """COCO images with their object boxes and classes; images without boxes are kept."""

  name = 'coco_instances'
  USE_CAPTIONS = False
  USE_INSTANCES = True
  DESCRIPTION = 'COCO images with object boxes and classes (captions left empty).'
