"""The embedded corpus (e2e_vlp.data.corpus), read by the generic builders.

`embedded` is the pre-training mix: COCO captions and COCO instances with attributes,
one example per image with all its captions. The other three are the generic VQA v2,
NLVR2 and Karpathy builders pointed at the corpus' files under their own names.
"""

from e2e_vlp.data.builders import coco, flickr30k, nlvr2, vqa_v2

_INSTRUCTIONS = ('manual_dir is a folder written by e2e_vlp.data.corpus.generate (or '
                 '`python launch/prepare_data.py --dataset embedded`).')


class Embedded(coco.CocoBuilder, skip_registration=True):
  """Pre-training examples: captions + boxes + classes + attributes per image."""

  name = 'embedded'
  USE_CAPTIONS = True
  USE_INSTANCES = True
  DESCRIPTION = 'Generated shape scenes with captions, boxes, classes and attributes.'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS


class EmbeddedVqa(vqa_v2.VqaV2, skip_registration=True):
  name = 'embedded_vqa'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS


class EmbeddedNlvr2(nlvr2.Nlvr2, skip_registration=True):
  name = 'embedded_nlvr2'
  MANUAL_SUBDIR = 'nlvr2'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS


class EmbeddedRetrieval(flickr30k.Flickr30k, skip_registration=True):
  name = 'embedded_retrieval'
  KARPATHY_JSON = 'dataset_embedded.json'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
