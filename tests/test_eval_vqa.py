"""VQA accuracy against hand-computed values of the official formula."""

import json

import pytest

from e2e_vlp.eval import vqa


@pytest.mark.parametrize('raw, expected', [
    ('Yes.', 'yes'),  # period dropped, lowercased
    ('yes', 'yes'),
    ('Two', '2'),  # number word -> digit
    ('The two', '2'),  # article dropped after the digit map
    ('none', '0'),
    ('a dog', 'dog'),
    ('an apple', 'apple'),
    ('dont', "don't"),  # contraction restored
    ('isnt it', "isn't it"),
    ('black/white', 'black white'),  # mark not touching a space -> space
    ('black / white', 'black white'),  # mark touching a space -> deleted
    ('1,000', '1000'),  # digit-comma-digit: every mark deleted
    ('2.5', '2.5'),  # a period before a digit stays
    ('  red\tand\nblue ', 'red and blue'),
    ('what?!', 'what'),
    ("it's", "it's"),  # apostrophes are not punctuation
])
def test_normalize_answer(raw, expected):
  assert vqa.normalize_answer(raw) == expected


@pytest.mark.parametrize('prediction, gt, expected', [
    # 10 identical answers: every leave-one-out subset has 9 matches -> 1.
    ('yes', ['yes'] * 10, 1.0),
    # Humans disagree -> everything normalised: "Yes." == "yes", 9 matches -> 1.
    ('Yes.', ['yes'] * 9 + ['no'], 1.0),
    # 3 matches: the 3 subsets without a match-holder have 2 (2/3), the 7 others 3 (1).
    ('two', ['2'] * 3 + ['3'] * 7, (3 * 2 / 3 + 7 * 1) / 10),
    # Number words are normalised on the human side too: all ten become "2".
    ('2', ['2'] * 3 + ['two'] * 7, 1.0),
    # 2 matches: 2 subsets with 1 (1/3), 8 subsets with 2 (2/3).
    ('a dog', ['dog'] * 2 + ['cat'] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),
    ('the dog', ['a dog'] * 2 + ['cat'] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),
    # 1 match: 9 subsets with 1 match (1/3), the one without it 0.
    ('Red', ['red'] + ['blue'] * 9, 9 * (1 / 3) / 10),
    ('green', ['red'] + ['blue'] * 9, 0.0),
    # Contraction restored: 4 matches -> every subset has >= 3.
    ('dont', ["don't"] * 4 + ['no'] * 6, 1.0),
    ('Black / White', ['black/white'] * 5 + ['gray'] * 5, 1.0),
    ('1,000', ['1000'] * 2 + ['100'] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),
    # Official quirk: identical human answers are compared exactly, unnormalised.
    ('Yes.', ['yes'] * 10, 0.0),
    ('yes', ['Yes'] * 10, 0.0),
    ('yes!', ['yes!'] * 10, 1.0),
    (' The Beatles\n', ['The Beatles'] * 10, 1.0),  # whitespace is always cleaned
    ('yes', [{'answer': 'yes', 'answer_id': i} for i in range(10)], 1.0),
])
def test_question_accuracy(prediction, gt, expected):
  assert vqa.question_accuracy(prediction, gt) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_breakdowns_and_submission(tmp_path):
  annotations = [
      {'question_id': 1, 'answer_type': 'yes/no', 'question_type': 'is the',
       'answers': ['yes'] * 10},
      {'question_id': 2, 'answer_type': 'number', 'question_type': 'how many',
       'answers': ['2'] * 3 + ['3'] * 7},
      {'question_id': 3, 'answer_type': 'other', 'question_type': 'what color',
       'answers': ['red'] + ['blue'] * 9},
      {'question_id': 4, 'answer_type': 'yes/no', 'question_type': 'is the',
       'answers': ['no'] * 10},
  ]
  predictions = {1: 'yes', 2: 'two', 3: 'red', 4: 'yes'}
  acc = vqa.vqa_accuracy(predictions, annotations)
  per_question = {1: 100.0, 2: 90.0, 3: 30.0, 4: 0.0}
  assert acc['per_question'] == pytest.approx(per_question)
  assert acc['overall'] == pytest.approx((100 + 90 + 30 + 0) / 4)
  assert acc['per_answer_type'] == pytest.approx({'yes/no': 50.0, 'number': 90.0,
                                                  'other': 30.0})
  assert acc['per_question_type'] == pytest.approx({'is the': 50.0, 'how many': 90.0,
                                                    'what color': 30.0})

  path = tmp_path / 'vqa_results.json'
  vqa.write_submission(predictions, str(path))
  assert json.loads(path.read_text()) == [
      {'question_id': 1, 'answer': 'yes'}, {'question_id': 2, 'answer': 'two'},
      {'question_id': 3, 'answer': 'red'}, {'question_id': 4, 'answer': 'yes'}]


def test_mismatched_questions_raise():
  annotations = [{'question_id': 1, 'answers': ['yes'] * 10}]
  with pytest.raises(ValueError, match='1 annotated questions have no prediction'):
    vqa.vqa_accuracy({2: 'yes'}, annotations)
  with pytest.raises(ValueError, match='at least one ground-truth answer'):
    vqa.question_accuracy('yes', [])
