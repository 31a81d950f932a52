"""VQA v2 accuracy, reproducing the official evaluation script exactly.

Reference: `PythonEvaluationTools/vqaEvaluation/vqaEval.py` in GT-Vision-Lab/VQA (master,
the logic its maintainers confirm in issue #14 and that LAVIS and lmms-eval follow).
Per question, with the ten human answers `a_1..a_10` and the prediction `p`:

  acc = mean_i min(1, #{j != i : a_j == p} / 3)

(the average over the ten leave-one-out subsets of nine answers). Normalisation follows
the script, quirks included:

* every answer and the prediction lose newlines, tabs and outer spaces;
* if the human answers differ, all of them and the prediction are normalised
  (`normalize_answer`: punctuation, lowercase, number words -> digits, articles,
  contractions);
* if all human answers are identical, nothing is normalised and the comparison is exact
  (meant for OCR answers): "Yes." scores 0 against ten "yes". Predictions taken from an
  answer vocabulary built with `normalize_answer` are unaffected.

(An older version of the script normalised only the prediction, and the human answers'
punctuation; its numbers differ slightly.) Accuracies are returned in percent (0-100),
unrounded (the script rounds to 2 decimals).
"""

import json
import re
from typing import Any, Iterable, Mapping, Sequence

# Word -> digit map, articles and contraction fixes of the official script.
_NUMBER_WORDS = {
    'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
    'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10',
}
_ARTICLES = frozenset({'a', 'an', 'the'})
# Keys with capitals ('Im', 'Ive', ...) never match after lowercasing; kept as in the script.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-',
                '>', '<', '@', '`', ',', '?', '!')
_DIGIT_COMMA_DIGIT = re.compile(r'(\d)(,)(\d)')
# The script's pattern "(?!<=\d)(\.)(?!\d)" has a mistyped look-behind that always holds:
# it removes every period not followed by a digit ("yes." -> "yes", "2.5" stays).
_PERIOD = re.compile(r'\.(?!\d)')
# The script passes re.UNICODE (32) positionally to `sub`, where it is the count.
_MAX_PERIODS = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
  """The script's `processPunctuation`: delete or space out punctuation, drop periods.

  A mark is deleted when it touches a space anywhere in the text, or when the text holds
  a digit-comma-digit group ("1,000" -> "1000"); otherwise it becomes a space
  ("black/white" -> "black white"). All tests look at the original text.
  """
  out = text
  has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
  for mark in _PUNCTUATION:
    if mark + ' ' in text or ' ' + mark in text or has_digit_comma:
      out = out.replace(mark, '')
    else:
      out = out.replace(mark, ' ')
  return _PERIOD.sub('', out, count=_MAX_PERIODS)


def _process_digit_article(text: str) -> str:
  """The script's `processDigitArticle`: lowercase, number words -> digits, drop
  articles, restore apostrophes of common contractions ("dont" -> "don't")."""
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return ' '.join(_CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(answer: str) -> str:
  return answer.replace('\n', ' ').replace('\t', ' ').strip()


def normalize_answer(answer: str) -> str:
  """Normalises an answer as the official script does when the humans disagree.

  Also the normalisation to use when building an answer vocabulary, so that
  vocabulary entries compare equal to normalised human answers.
  Examples: "Yes." -> "yes", "Two" -> "2", "a dog" -> "dog", "dont" -> "don't".
  """
  return _process_digit_article(_process_punctuation(_clean_whitespace(answer)))


def _answer_text(answer: str | Mapping[str, Any]) -> str:
  return answer if isinstance(answer, str) else answer['answer']


def question_accuracy(prediction: str, gt_answers: Sequence[str | Mapping[str, Any]]) -> float:
  """Official accuracy in [0, 1] of one predicted answer against the human answers.

  Args:
    prediction: the model's answer, raw (processed here).
    gt_answers: the human answers (usually 10), as strings or the annotation dicts
      `{'answer': ...}`; processed as the script does (see the module docstring).
  """
  if not gt_answers:
    raise ValueError('question_accuracy needs at least one ground-truth answer; got none.')
  pred = _clean_whitespace(prediction)
  gts = [_clean_whitespace(_answer_text(a)) for a in gt_answers]
  if len(set(gts)) > 1:
    gts = [normalize_answer(a) for a in gts]
    pred = normalize_answer(pred)
  matches = sum(a == pred for a in gts)
  # Leaving answer i out removes one match exactly when a_i itself matches.
  return sum(min(1.0, (matches - (a == pred)) / 3.0) for a in gts) / len(gts)


def _mean_percent(values: Sequence[float]) -> float:
  return 100.0 * sum(values) / len(values)


def vqa_accuracy(predictions: Mapping[int, str],
                 annotations: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Official VQA accuracy over a set of questions, in percent.

  Args:
    predictions: question_id -> predicted answer (raw text).
    annotations: the official annotation records, each with `question_id` and
      `answers` (strings or `{'answer': ...}` dicts) and, for the breakdowns, optional
      `answer_type` and `question_type`.

  Returns:
    `{'overall': float, 'per_answer_type': {type: float}, 'per_question_type':
    {type: float}, 'per_question': {question_id: float}}`, all in percent.

  Raises:
    ValueError: when the predictions and the annotations cover different questions
      (the official script asserts the same).
  """
  annotations = list(annotations)
  if not annotations:
    raise ValueError('vqa_accuracy got no annotations; pass at least one question.')
  gt_ids = {int(a['question_id']) for a in annotations}
  pred_ids = {int(q) for q in predictions}
  if gt_ids != pred_ids:
    missing, extra = sorted(gt_ids - pred_ids), sorted(pred_ids - gt_ids)
    raise ValueError(
        f'Predictions and annotations cover different questions: {len(missing)} '
        f'annotated questions have no prediction (e.g. {missing[:5]}), {len(extra)} '
        f'predictions have no annotation (e.g. {extra[:5]}). Evaluate the predictions '
        'against the annotations of exactly the questions that were predicted.')
  preds = {int(q): a for q, a in predictions.items()}
  per_question = {}
  by_answer_type: dict[str, list[float]] = {}
  by_question_type: dict[str, list[float]] = {}
  for ann in annotations:
    qid = int(ann['question_id'])
    acc = question_accuracy(preds[qid], ann['answers'])
    per_question[qid] = 100.0 * acc
    if ann.get('answer_type') is not None:
      by_answer_type.setdefault(ann['answer_type'], []).append(acc)
    if ann.get('question_type') is not None:
      by_question_type.setdefault(ann['question_type'], []).append(acc)
  return {
      'overall': sum(per_question.values()) / len(per_question),
      'per_answer_type': {k: _mean_percent(v) for k, v in by_answer_type.items()},
      'per_question_type': {k: _mean_percent(v) for k, v in by_question_type.items()},
      'per_question': per_question,
  }


def submission(predictions: Mapping[int, str]) -> list[dict[str, Any]]:
  """The official results format `[{'question_id': int, 'answer': str}]`, sorted by id.

  Answers are written as given: the evaluation server normalises them itself.
  """
  return [{'question_id': int(q), 'answer': str(a)} for q, a in sorted(predictions.items())]


def write_submission(predictions: Mapping[int, str], path: str) -> None:
  """Writes `submission(predictions)` as JSON to `path` (e.g. the EvalAI upload)."""
  with open(path, 'w') as f:
    json.dump(submission(predictions), f)
