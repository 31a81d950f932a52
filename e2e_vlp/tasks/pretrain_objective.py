"""The pre-training objective: the batch contract's shapes and the weighted loss sum.

Kept free of TensorFlow (unlike the task, which owns the tf.data pipeline), so that
accelerator benchmarks on hosts without TensorFlow use the very same definitions.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from e2e_vlp.losses import detection as det_losses
from e2e_vlp.losses import text as text_losses


def batch_shapes(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, Any]:
  """Global shapes and dtypes of a pre-training batch (the data contract)."""
  d = config.data
  s, l, t, m = d.image_size, d.max_text_len, d.max_caption_len, d.max_boxes
  k = d.max_attributes
  spec = {
      'image': ((s, s, 3), jnp.float32), 'image_mask': ((s, s), jnp.bool_),
      'text_ids': ((l,), jnp.int32), 'text_mask': ((l,), jnp.bool_),
      'mlm_labels': ((l,), jnp.int32), 'itm_label': ((), jnp.int32),
      'caption_in': ((t,), jnp.int32), 'caption_out': ((t,), jnp.int32),
      'caption_mask': ((t,), jnp.bool_), 'boxes': ((m, 4), jnp.float32),
      'labels': ((m,), jnp.int32), 'attributes': ((m, k), jnp.int32),
      'box_mask': ((m,), jnp.bool_),
  }
  return {key: jax.ShapeDtypeStruct((batch_size,) + shape, dtype)
          for key, (shape, dtype) in spec.items()}


def pretrain_losses(outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
                    config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the four pre-training losses (and the optional cell loss)."""
  w = config.loss
  metrics = {}
  total = jnp.zeros((), jnp.float32)
  positive = batch['itm_label'].astype(jnp.float32)
  mlm_weight = None if w.mlm_on_negatives else positive
  terms = {
      'mlm': (w.mlm, lambda: text_losses.mlm_loss(outputs['mlm_logits'], batch['mlm_labels'],
                                                    mlm_weight)),
      'itm': (w.itm, lambda: text_losses.itm_loss(outputs['itm_logits'], batch['itm_label'])),
      'detection': (w.detection, lambda: det_losses.set_prediction_loss(outputs, batch, w.det)),
      'caption': (w.caption, lambda: text_losses.caption_loss(
          outputs['caption_logits'], batch['caption_out'], batch['caption_mask'],
          label_smoothing=w.label_smoothing)),
      'cell_class': (w.cell_class, lambda: det_losses.cell_class_loss(
          outputs['cell_class_logits'], outputs['cell_centers'], outputs['visual_mask'], batch)),
  }
  for name, (weight, fn) in terms.items():
    if weight:
      loss, term_metrics = fn()
      total = total + weight * loss
      metrics.update(term_metrics)
      metrics[f'{name}_loss'] = loss
  return total, metrics
