"""MLM, ITM and caption losses against direct numpy computations."""

import jax
import numpy as np
import pytest

from e2e_vlp.losses import text


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlm_loss_weights_labelled_tokens_of_weighted_examples():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
  labels = np.full((3, 5), -1, np.int32)
  labels[0, [1, 3]] = [4, 7]
  labels[1, 0] = 2
  labels[2, [2, 4]] = [9, 1]  # example 2 has weight 0: ignored
  logits[0, 1, 4] = 9.0  # one certainly right prediction
  example_weight = np.array([1.0, 0.5, 0.0], np.float32)
  loss, metrics = jax.jit(text.mlm_loss)(logits, labels, example_weight)

  log_probs = _log_softmax(logits)
  terms = [(1.0, -log_probs[0, 1, 4], 1), (1.0, -log_probs[0, 3, 7], logits[0, 3].argmax() == 7),
           (0.5, -log_probs[1, 0, 2], logits[1, 0].argmax() == 2)]
  weights = np.array([w for w, _, _ in terms])
  want = (weights * [ce for _, ce, _ in terms]).sum() / weights.sum()
  want_acc = (weights * [c for _, _, c in terms]).sum() / weights.sum()
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(metrics['mlm_loss'], want, rtol=1e-6)
  np.testing.assert_allclose(metrics['mlm_accuracy'], want_acc, rtol=1e-6)

  unweighted, _ = jax.jit(text.mlm_loss)(logits, labels)
  ces = [-log_probs[0, 1, 4], -log_probs[0, 3, 7], -log_probs[1, 0, 2], -log_probs[2, 2, 9],
         -log_probs[2, 4, 1]]
  np.testing.assert_allclose(unweighted, np.mean(ces), rtol=1e-6)


def test_mlm_loss_without_masked_tokens_is_zero_not_nan():
  loss, metrics = jax.jit(text.mlm_loss)(np.zeros((2, 3, 4), np.float32), np.full((2, 3), -1))
  assert loss == 0 and metrics['mlm_accuracy'] == 0


def test_itm_loss():
  logits = np.array([[2.0, -1.0], [0.5, 0.7], [-3.0, 1.0]], np.float32)
  labels = np.array([0, 0, 1])
  loss, metrics = jax.jit(text.itm_loss)(logits, labels)
  log_probs = _log_softmax(logits)
  np.testing.assert_allclose(loss, -log_probs[np.arange(3), labels].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['itm_accuracy'], 2 / 3, rtol=1e-6)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_caption_loss_with_label_smoothing(smoothing):
  rng = np.random.default_rng(1)
  vocab = 7
  logits = rng.normal(size=(2, 4, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (2, 4)).astype(np.int32)
  targets[1, 3] = -1  # padding label, masked out
  mask = np.array([[True, True, True, False], [True, True, True, False]])
  logits[0, 0, targets[0, 0]] = 8.0
  loss, metrics = jax.jit(text.caption_loss, static_argnums=3)(logits, targets, mask,
                                                                smoothing)
  log_probs = _log_softmax(logits)
  ces, correct = [], []
  for b in range(2):
    for t in range(4):
      if mask[b, t]:
        soft = np.full(vocab, smoothing / vocab)
        soft[targets[b, t]] += 1 - smoothing
        ces.append(-(soft * log_probs[b, t]).sum())
        correct.append(logits[b, t].argmax() == targets[b, t])
  np.testing.assert_allclose(loss, np.mean(ces), rtol=1e-6)
  np.testing.assert_allclose(metrics['caption_loss'], np.mean(ces), rtol=1e-6)
  np.testing.assert_allclose(metrics['caption_accuracy'], np.mean(correct), rtol=1e-6)


def test_shape_errors_name_the_expected_shape():
  with pytest.raises(ValueError, match=r'mlm_labels should have shape \[2, 3\]'):
    text.mlm_loss(np.zeros((2, 3, 5)), np.zeros((2, 4), np.int32))
  with pytest.raises(ValueError, match=r'itm logits should have shape \[B, 2\]'):
    text.itm_loss(np.zeros((2, 3)), np.zeros((2,), np.int32))
