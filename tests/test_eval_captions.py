"""Caption metrics through pycocoevalcap on a tiny reference set (needs Java)."""

import math
import shutil

import pytest

from e2e_vlp.eval import captions

pytestmark = pytest.mark.skipif(shutil.which('java') is None,
                                reason='pycocoevalcap needs Java (openjdk) on the PATH')

REFERENCES = {
    1: ['A dog runs on the beach.', 'a brown dog running near water'],
    2: ['Two people ride bicycles down a street', 'cyclists on a city road'],
    3: ['a red bus parked at the station', 'a bus waits at a stop'],
}


def test_results_json_loads_in_pycocotools(tmp_path):
  coco_gt = captions.caption_ground_truth(REFERENCES)
  results = captions.caption_results({3: 'a bus', 1: 'a dog'})
  assert results == [{'image_id': 1, 'caption': 'a dog'}, {'image_id': 3, 'caption': 'a bus'}]
  path = tmp_path / 'captions.json'
  captions.write_results(results, str(path))
  coco_res = coco_gt.loadRes(str(path))
  assert sorted(coco_res.getImgIds()) == [1, 3]
  assert coco_res.imgToAnns[3][0]['caption'] == 'a bus'


def test_identical_and_partial_captions():
  coco_gt = captions.caption_ground_truth(REFERENCES)
  # Identical to a reference after PTB tokenisation (case and the final period drop).
  identical = captions.caption_results({i: refs[0] for i, refs in REFERENCES.items()})
  scores = captions.evaluate_captions(coco_gt, identical)
  assert set(scores) == set(captions.METRICS)
  for n in range(1, 5):
    assert scores[f'Bleu_{n}'] == pytest.approx(1.0, abs=1e-6)
  assert scores['ROUGE_L'] == pytest.approx(1.0, abs=1e-6)
  assert scores['METEOR'] == pytest.approx(1.0, abs=1e-6)
  assert scores['CIDEr'] > 0.0
  assert scores['SPICE'] is None

  # One wrong word in image 1 (6 tokens); images 2 and 3 exact (7 tokens each).
  # Corpus BLEU: unigrams 19/20 match, bigrams 3/5 + 6/6 + 6/6 = 15/17; brevity penalty 1.
  partial = dict(identical[0], caption='a cat runs on the beach')
  scores_partial = captions.evaluate_captions(coco_gt, [partial] + identical[1:],
                                              meteor=False)  # saves a slow Java start
  assert set(scores_partial) == set(captions.METRICS) - {'METEOR'}
  assert scores_partial['Bleu_1'] == pytest.approx(19 / 20, rel=1e-6)
  assert scores_partial['Bleu_2'] == pytest.approx(math.sqrt(19 / 20 * 15 / 17), rel=1e-6)
  assert scores_partial['CIDEr'] < scores['CIDEr']


def test_errors(monkeypatch):
  coco_gt = captions.caption_ground_truth(REFERENCES)
  with pytest.raises(ValueError, match='exactly one caption'):
    captions.evaluate_captions(coco_gt, [{'image_id': 1, 'caption': 'a'}] * 2)
  with pytest.raises(ValueError, match='no reference captions'):
    captions.evaluate_captions(coco_gt, [{'image_id': 7, 'caption': 'a'}])
  monkeypatch.setattr(shutil, 'which', lambda _: None)
  with pytest.raises(RuntimeError, match='need Java'):
    captions.evaluate_captions(coco_gt, [{'image_id': 1, 'caption': 'a'}])
