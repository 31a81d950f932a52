"""Output heads: tied language-model heads, pooler, detection head, classifier MLPs.

Names follow Hugging Face BERT where one exists (`pooler/dense`; MLM
`transform/{dense,LayerNorm}` + `bias`, the decoder matrix tied to the word embeddings).
"""

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2e_vlp.models import layers

INIT_BOX_SIZE = 0.2  # reference-point boxes start as 0.2 x 0.2 of the image (assumed)


class TiedLMHead(nn.Module):
  """logits = attend(transform(x)) + bias, `attend` being x @ word_embeddings.T.

  Attributes:
    transform: BERT's prediction transform (dense + GELU + LayerNorm) before the tied
      projection (MLM); False for the caption decoder, whose final LayerNorm suffices.
  """
  vocab_size: int
  epsilon: float
  transform: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, attend: Callable[[jnp.ndarray], jnp.ndarray]
               ) -> jnp.ndarray:
    """[B, L, D] -> [B, L, V] float32."""
    if self.transform:
      x = PredictionTransform(self.epsilon, self.dtype, name='transform')(x)
    bias = self.param('bias', layers.partitioned(nn.initializers.zeros, ('vocab',)),
                      (self.vocab_size,), layers.PARAM_DTYPE)
    logits = attend(x).astype(jnp.float32) + bias
    return layers.constrain(logits, layers.ACT_BLV)


class PredictionTransform(nn.Module):
  """BERT's `cls/predictions/transform`: dense (d -> d), exact GELU, LayerNorm."""
  epsilon: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[..., D] -> [..., D]."""
    d = x.shape[-1]
    x = nn.gelu(layers.dense(d, ('embed', 'mlp'), dtype=self.dtype, name='dense')(x),
                approximate=False)
    return layers.layer_norm(self.epsilon, dtype=self.dtype, name='LayerNorm')(x)


class Pooler(nn.Module):
  """BERT's pooler: tanh(dense(h[:, 0]))."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jnp.ndarray) -> jnp.ndarray:
    """[B, L, D] -> [B, D] (from the [CLS] position)."""
    d = hidden.shape[-1]
    return jnp.tanh(layers.dense(d, ('embed', 'mlp'), dtype=self.dtype, name='dense')(
        hidden[:, 0]))


class ClassifierMLP(nn.Module):
  """UNITER/LXMERT answer head: dense (hidden), GELU, LayerNorm, dense (num_outputs)."""
  hidden: int
  num_outputs: int
  epsilon: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, Din] -> [B, num_outputs] float32."""
    x = layers.dense(self.hidden, ('embed', 'mlp'), dtype=self.dtype, name='dense_0')(x)
    x = layers.layer_norm(self.epsilon, dtype=self.dtype, name='LayerNorm')(
        nn.gelu(x, approximate=False))
    x = layers.dense(self.num_outputs, ('mlp', 'classes'), dtype=self.dtype, name='dense_1')(x)
    return x.astype(jnp.float32)


def inverse_sigmoid(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
  """logit(x), clipped away from 0 and 1 (Deformable DETR)."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps)) - jnp.log(jnp.maximum(1 - x, eps))


class DetectionHead(nn.Module):
  """Per-query class (+ no-object), attribute and box predictions, shared over layers.

  With reference points the box MLP predicts (dx, dy, w, h) in logit space:
  (cx, cy) = sigmoid(logit(reference) + (dx, dy)); its last layer is zero-initialised
  with a bias giving INIT_BOX_SIZE boxes centred on the reference points.
  """
  num_classes: int
  num_attributes: int
  box_layers: int
  reference_points: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jnp.ndarray, reference: jnp.ndarray | None
               ) -> dict[str, jnp.ndarray]:
    """Heads on decoder outputs.

    Args:
      hidden: [Dl, B, Q, D] normed output of every decoder layer.
      reference: [Q, 2] (x, y) reference points or None.

    Returns:
      det_class_logits [Dl, B, Q, C+1] (last = no-object), det_attr_logits
      [Dl, B, Q, A], det_boxes [Dl, B, Q, 4] sigmoid (cx, cy, w, h); all float32.
    """
    d = hidden.shape[-1]
    class_logits = layers.dense(self.num_classes + 1, ('embed', 'classes'), dtype=self.dtype,
                                name='class_embed')(hidden)
    attr_logits = layers.dense(self.num_attributes, ('embed', 'classes'), dtype=self.dtype,
                               name='attr_embed')(hidden)
    if self.reference_points:
      if reference is None:
        raise ValueError('reference_points=True needs the query reference points.')
      size = math.log(INIT_BOX_SIZE / (1 - INIT_BOX_SIZE))
      box_bias = lambda key, shape, dtype=jnp.float32: jnp.array([0, 0, size, size], dtype)
      out = layers.MLP(d, 4, self.box_layers, dtype=self.dtype, name='bbox_embed',
                       last_kernel_init=nn.initializers.zeros,
                       last_bias_init=box_bias)(hidden).astype(jnp.float32)
      center = jax.nn.sigmoid(out[..., :2] + inverse_sigmoid(reference))
      boxes = jnp.concatenate([center, jax.nn.sigmoid(out[..., 2:])], axis=-1)
    else:
      boxes = jax.nn.sigmoid(layers.MLP(d, 4, self.box_layers, dtype=self.dtype,
                                        name='bbox_embed')(hidden).astype(jnp.float32))
    return {
        'det_class_logits': class_logits.astype(jnp.float32),
        'det_attr_logits': attr_logits.astype(jnp.float32),
        'det_boxes': boxes,
    }
