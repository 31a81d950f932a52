"""COCO caption metrics with the official pycocoevalcap scorers.

BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), computed as `pycocoevalcap.eval.COCOEvalCap`
does (PTB tokenisation of references and candidates, then each scorer), under its metric
names. Predictions and references meet as pycocotools objects, so a results file that
scores here also loads in the official tools.

Java: the PTB tokenizer and METEOR run Java programs shipped with pycocoevalcap. Without
`java` on the PATH `evaluate_captions` raises (no metric is computed at all, because the
tokenisation every metric depends on needs Java too). The tokenizer prints one line to
stderr per call ("PTBTokenizer tokenized ..."), from its own process.

SPICE: pycocoevalcap downloads Stanford CoreNLP on first use, impossible offline, so the
result holds `'SPICE': None` (see `SPICE_NOTE`) instead of a number.
"""

import collections
import contextlib
import io
import json
import shutil
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO

METRICS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE')
SPICE_NOTE = ('SPICE not computed: pycocoevalcap downloads Stanford CoreNLP models for it '
              'on first use, which this offline setup cannot do; reported as None.')


def _maybe_quiet(quiet: bool):
  """Swallows Python-level prints (pycocotools, BLEU) when `quiet`."""
  return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def caption_results(captions: Mapping[int, str]) -> list[dict[str, Any]]:
  """The COCO caption results format `[{'image_id': int, 'caption': str}]`, by image id."""
  return [{'image_id': int(i), 'caption': str(c)} for i, c in sorted(captions.items())]


def write_results(results: list[dict[str, Any]], path: str) -> None:
  """Writes caption results records as JSON (the COCO server upload format)."""
  with open(path, 'w') as f:
    json.dump(results, f)


def caption_ground_truth(references: Mapping[int, Sequence[str]], quiet: bool = True) -> COCO:
  """A pycocotools caption ground truth from `{image_id: [reference, ...]}` (no file)."""
  images, annotations = [], []
  for image_id, refs in sorted(references.items()):
    if not refs:
      raise ValueError(f'Image {image_id} has no reference caption; drop it or add some.')
    images.append({'id': int(image_id)})
    for ref in refs:
      annotations.append({'id': len(annotations) + 1, 'image_id': int(image_id),
                          'caption': str(ref)})
  coco = COCO()
  coco.dataset = {'images': images, 'annotations': annotations}
  with _maybe_quiet(quiet):
    coco.createIndex()
  return coco


def load_caption_ground_truth(path: str, quiet: bool = True) -> COCO:
  """The ground truth from an official `captions_*.json` (or a Karpathy-split file in it)."""
  with _maybe_quiet(quiet):
    return COCO(path)


def _require_java() -> None:
  if shutil.which('java') is None:
    raise RuntimeError(
        'Caption metrics need Java: pycocoevalcap tokenises with Stanford PTBTokenizer and '
        'scores METEOR with Java programs, and no `java` is on the PATH. Install a JRE '
        '(e.g. `apt-get install openjdk-17-jre-headless`) and retry.')


@contextlib.contextmanager
def _meteor() -> Iterator[Meteor]:
  """A METEOR scorer whose Java process is stopped on exit, not left to the GC."""
  scorer = Meteor()
  try:
    yield scorer
  finally:
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()


def evaluate_captions(coco_gt: COCO, results: list[dict[str, Any]], meteor: bool = True,
                      quiet: bool = True) -> dict[str, float | None]:
  """Scores caption results against references, over the images that have a result.

  Scoring only the predicted images is what the official demo does
  (`params['image_id'] = cocoRes.getImgIds()`); evaluating a subset of a split is then
  just predicting a subset.

  Args:
    coco_gt: references (`caption_ground_truth` or `load_caption_ground_truth`).
    results: `caption_results` records, one per image.
    meteor: compute METEOR; its Java scorer takes ~5-10 s to start, worth skipping in
      frequent in-training evaluations.
    quiet: hide Python-level prints.

  Returns:
    `METRICS` -> corpus score (BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr on its usual
    0-10 scale, 1.0 = 100 in papers); `'SPICE'` is None (`SPICE_NOTE`); no `'METEOR'`
    key when `meteor` is False.
  """
  _require_java()
  if not results:
    raise ValueError('evaluate_captions got no results; caption at least one image.')
  image_ids = [int(r['image_id']) for r in results]
  duplicates = sorted(i for i, n in collections.Counter(image_ids).items() if n > 1)
  if duplicates:
    raise ValueError(f'Each image needs exactly one caption; images {duplicates[:5]} have '
                     'several.')
  without_refs = [i for i in image_ids if not coco_gt.imgToAnns.get(i)]
  if without_refs:
    raise ValueError(f'Images {without_refs[:5]} have no reference captions to score against; '
                     'build the references from the same images.')
  with _maybe_quiet(quiet):
    coco_res = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds 'id' in place
  tokenizer = PTBTokenizer()
  gts = tokenizer.tokenize({i: coco_gt.imgToAnns[i] for i in image_ids})
  res = tokenizer.tokenize({i: coco_res.imgToAnns[i] for i in image_ids})

  scores: dict[str, float | None] = {}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  scores.update({f'Bleu_{n + 1}': float(b) for n, b in enumerate(bleu)})
  if meteor:
    with _meteor() as scorer:
      scores['METEOR'] = float(scorer.compute_score(gts, res)[0])
  scores['ROUGE_L'] = float(Rouge().compute_score(gts, res)[0])
  scores['CIDEr'] = float(Cider().compute_score(gts, res)[0])
  scores['SPICE'] = None
  logging.log_first_n(logging.WARNING, SPICE_NOTE, 1)
  return scores
