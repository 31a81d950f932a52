"""Text losses: masked language modelling, image-text matching, caption generation.

Logits are cast to float32 first, so a bfloat16 model still gets float32 losses.
"""

import jax
import jax.numpy as jnp
import optax

Metrics = dict[str, jax.Array]


def _check_shape(name: str, x: jax.Array, expected: tuple[int | str, ...]) -> None:
  ok = x.ndim == len(expected) and all(
      isinstance(e, str) or e == s for s, e in zip(x.shape, expected))
  if not ok:
    want = ', '.join(str(e) for e in expected)
    raise ValueError(f'{name} should have shape [{want}], got {tuple(x.shape)}.')


def _mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean; 0 (not NaN) when every weight is 0, e.g. a batch with no masked token."""
  return (values * weights).sum() / jnp.maximum(weights.sum(), 1e-12)


def _token_ce(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token CE and correctness; labels outside [0, V) are clipped (mask them out)."""
  logits = logits.astype(jnp.float32)
  safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  return ce, (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)


def mlm_loss(logits: jax.Array, labels: jax.Array,
             example_weight: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """Masked-LM cross-entropy, averaged over the labelled tokens of weighted examples.

  Args:
    logits: `[B, L, V]`.
    labels: `[B, L]` int, original token id at masked positions, -1 elsewhere.
    example_weight: `[B]` (e.g. 1 for matched image-text pairs, 0 for ITM negatives), or
      None for all ones.

  Returns:
    The loss and metrics mlm_loss, mlm_accuracy.
  """
  _check_shape('mlm logits', logits, ('B', 'L', 'V'))
  _check_shape('mlm_labels', labels, logits.shape[:2])
  weight = (labels >= 0).astype(jnp.float32)
  if example_weight is not None:
    _check_shape('example_weight', example_weight, logits.shape[:1])
    weight = weight * example_weight.astype(jnp.float32)[:, None]
  ce, correct = _token_ce(logits, labels)
  loss = _mean(ce, weight)
  return loss, {'mlm_loss': loss, 'mlm_accuracy': _mean(correct, weight)}


def itm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, Metrics]:
  """Image-text matching: `[B, 2]` logits, `[B]` labels (1 = matched pair)."""
  _check_shape('itm logits', logits, ('B', 2))
  _check_shape('itm_label', labels, logits.shape[:1])
  ce, correct = _token_ce(logits, labels)
  loss = ce.mean()
  return loss, {'itm_loss': loss, 'itm_accuracy': correct.mean()}


def caption_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
  """Caption LM cross-entropy against optionally smoothed labels, over real tokens.

  Args:
    logits: `[B, T, V]` decoder outputs.
    targets: `[B, T]` int, the next tokens (`... [EOS]`).
    mask: `[B, T]` bool, real target tokens.
    label_smoothing: `config.loss.label_smoothing`; the target puts 1 - s on the label
      and s / V on every token (optax.smooth_labels).

  Returns:
    The loss and metrics caption_loss, caption_accuracy.
  """
  _check_shape('caption logits', logits, ('B', 'T', 'V'))
  _check_shape('caption_out', targets, logits.shape[:2])
  _check_shape('caption_mask', mask, logits.shape[:2])
  logits = logits.astype(jnp.float32)
  safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
  soft = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1]), label_smoothing)
  ce = optax.softmax_cross_entropy(logits, soft)
  weight = mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
  loss = _mean(ce, weight)
  return loss, {'caption_loss': loss, 'caption_accuracy': _mean(correct, weight)}
