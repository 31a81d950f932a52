"""Shared test pieces: a pre-training config small enough for end-to-end tests on 2 CPU
cores, and a toy model for checkpoint tests."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from configs import pretrain

MICRO_TRAIN_IMAGES = 64
MICRO_VAL_IMAGES = 16


def micro_config(cache_dir: str, **overrides) -> ml_collections.ConfigDict:
  """`tiny` shrunk (small dims, 64-image corpus); `overrides` are dotted field paths."""
  config = pretrain.get_config('tiny')
  m, d, t = config.model, config.data, config.train
  m.d_model, m.num_heads, m.mlp_dim = 32, 4, 64
  m.encoder_layers = m.decoder_layers = m.caption_decoder_layers = m.fusion_layers = 1
  m.num_queries = 8
  m.backbone.width = 8
  d.corpus_train_images, d.corpus_val_images = MICRO_TRAIN_IMAGES, MICRO_VAL_IMAGES
  d.image_size, d.resize_sizes, d.max_size = 48, (40, 48), 48
  d.max_boxes, d.shuffle_buffer = 6, 64
  t.batch_size, t.total_steps = 8, 4
  t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 2, 4, 2, 1
  t.num_visualize = 2
  config.optim.warmup_steps = 1
  config.cache_dir = cache_dir
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


class ToyModel(nn.Module):
  """x [B, F] -> (x @ kernel) * scale, kernel [F, 16] a logically partitioned parameter,
  scale a constant 2 in 'batch_stats': the smallest model with both collections."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('embed', 'mlp')), (x.shape[-1], 16))
    scale = self.variable('batch_stats', 'scale', lambda: jnp.full((16,), 2.0))
    return (x @ kernel) * scale.value
