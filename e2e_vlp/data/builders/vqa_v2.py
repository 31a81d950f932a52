"""VQA v2: one example per question, with sparse soft targets over an answer vocabulary.

The vocabulary is the `num_answers` most frequent normalised `multiple_choice_answer`s
of the training split (3,129 in the bottom-up-attention setup the paper follows),
saved in the dataset's metadata (`load_answer_vocab`). An answer's target score is the
official `min(#humans who gave it / 3, 1)` after the official answer normalisation.
"""

import collections
import dataclasses
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from e2e_vlp.data import records
from e2e_vlp.data.builders import common

# split -> (file-name split, image folder).
SPLITS = {'train': ('train2014', 'train2014'), 'val': ('val2014', 'val2014'),
          'test': ('test2015', 'test2015'), 'test_dev': ('test-dev2015', 'test2015')}

# The official VQA evaluation's answer normalisation (vqaEval.py, Agrawal et al.).
_PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>',
                '<', '@', '`', ',', '?', '!')
_COMMA_STRIP = re.compile(r'(\d)(,)(\d)')
_PERIOD_STRIP = re.compile(r'(?!<=\d)(\.)(?!\d)')  # sic: the official pattern
_NUMBERS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
            'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = ('a', 'an', 'the')
# Its contraction table, without the entries with capitals (they never match: the
# answer is lower-cased first).
_CONTRACTIONS = dict(pair.split('=') for pair in '''
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow'sat shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've'''.split())


def normalize_answer(answer: str) -> str:
  """The official VQA answer normalisation (punctuation, then digits and articles)."""
  text = answer.replace('\n', ' ').replace('\t', ' ').strip()
  out = text
  for p in _PUNCTUATION:
    if p + ' ' in text or ' ' + p in text or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  # sic: the official code passes re.UNICODE (32) as the count argument.
  out = _PERIOD_STRIP.sub('', out, count=re.UNICODE)
  words = [_NUMBERS.get(w, w) for w in out.lower().split()]
  return ' '.join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def soft_scores(answers: list[str], vocab_index: dict[str, int]) -> tuple[list[int], list[float]]:
  """Sparse targets: ids (ascending) and min(#humans / 3, 1) of in-vocabulary answers."""
  counts = collections.Counter(normalize_answer(a) for a in answers)
  pairs = sorted((vocab_index[a], min(n / 3.0, 1.0)) for a, n in counts.items()
                 if a in vocab_index)
  return [i for i, _ in pairs], [score for _, score in pairs]


@dataclasses.dataclass(eq=False)
class VqaConfig(tfds.core.BuilderConfig):
  num_answers: int = 3129


def _file(root: epath.Path, name: str) -> epath.Path | None:
  return common.find_file(root, [name, f'annotations/{name}', f'Questions/{name}',
                                 f'Annotations/{name}'])


class VqaV2(common.ManualBuilder, skip_registration=True):
  """VQA v2 questions on COCO images."""

  name = 'vqa_v2'
  BUILDER_CONFIGS = [VqaConfig(name='top3129', num_answers=3129)]
  HOMEPAGE = 'https://visualqa.org'
  DESCRIPTION = 'VQA v2: open-ended questions on COCO images with ten human answers each.'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place in manual_dir (or its annotations/): v2_OpenEnded_mscoco_{train,val}2014_questions'
      '.json, v2_mscoco_{train,val}2014_annotations.json (test2015 questions optional), and '
      'the COCO images in train2014/, val2014/ (test2015/).')

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        'question/id': np.int64,
        'image/id': np.int64,
        'image': common.image_feature(),
        'question': tfds.features.Text(),
        'question_type': tfds.features.Text(),
        'answer_type': tfds.features.Text(),
        'answers': tfds.features.Sequence(tfds.features.Text()),  # the ten raw answers
        'answer/ids': tfds.features.Sequence(np.int64),
        'answer/scores': tfds.features.Sequence(np.float32),
    })

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._root(dl_manager)
    found = {}
    for split, (file_split, image_dir) in SPLITS.items():
      questions = _file(root, f'v2_OpenEnded_mscoco_{file_split}_questions.json')
      annotations = _file(root, f'v2_mscoco_{file_split}_annotations.json')
      if questions is not None:
        found[split] = (questions, annotations, image_dir)
    annotated = [s for s in found if found[s][1] is not None]
    if not annotated:
      raise FileNotFoundError(f'No VQA v2 question + annotation files under {root}. '
                              f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    vocab_split = 'train' if 'train' in annotated else annotated[0]
    counts = collections.Counter(
        normalize_answer(a['multiple_choice_answer'])
        for a in common.read_json(found[vocab_split][1])['annotations'])
    answers = common.top_k(counts, self.builder_config.num_answers)
    self.info.metadata['answers'] = answers
    vocab_index = {a: i for i, a in enumerate(answers)}
    return {
        split: self._generate_examples(
            split, lambda counter, q=q, a=a, d=d: self._examples(root, q, a, d, vocab_index,
                                                                 counter))
        for split, (q, a, d) in found.items()
    }

  def _examples(self, root: epath.Path, questions_path: epath.Path,
                annotations_path: epath.Path | None, image_dir: str,
                vocab_index: dict[str, int], counter: records.SkipCounter
                ) -> Iterator[common.Example]:
    by_image = collections.defaultdict(list)
    for q in common.read_json(questions_path)['questions']:
      by_image[q['image_id']].append(q)
    labels: dict[int, dict[str, Any]] = {}
    if annotations_path is not None:
      labels = {a['question_id']: a for a in common.read_json(annotations_path)['annotations']}
    for image_id in sorted(by_image):
      name = f'COCO_{image_dir}_{image_id:012d}.jpg'
      path = common.find_file(root, [f'{image_dir}/{name}', f'images/{image_dir}/{name}'])
      loaded = records.load_rgb_jpeg(path or root / image_dir / name, counter)
      if loaded is None:
        counter.count('question_without_image', len(by_image[image_id]))
        continue
      jpeg = loaded[0]
      for q in sorted(by_image[image_id], key=lambda q: q['question_id']):
        if not isinstance(q.get('question'), str) or not q['question'].strip():
          counter.count('empty_question')
          continue
        label = labels.get(q['question_id'], {})
        if annotations_path is not None and not label.get('answers'):
          counter.count('missing_answers')
          continue
        raw = [a['answer'] for a in label.get('answers', [])]
        ids, scores = soft_scores(raw, vocab_index)
        yield q['question_id'], {
            'question/id': q['question_id'], 'image/id': image_id, 'image': jpeg,
            'question': q['question'].strip(), 'question_type': label.get('question_type', ''),
            'answer_type': label.get('answer_type', ''), 'answers': raw,
            'answer/ids': np.asarray(ids, np.int64),
            'answer/scores': np.asarray(scores, np.float32)}
