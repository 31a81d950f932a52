"""Input embeddings: BERT text embeddings, visual grid tokens, caption tokens, object queries.

Text embeddings mirror Hugging Face BERT (`word_embeddings`, `position_embeddings`,
`token_type_embeddings`, `LayerNorm`), so a BERT checkpoint imports by renaming only.

Visual tokens = LayerNorm(1x1-conv(features) + 2-D sine position + modality embedding).
The LayerNorm (our choice; the paper does not say) puts both modalities on the same
scale when they enter the BERT encoder, just as BERT normalises its own embedding sum.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2e_vlp.models import layers
from e2e_vlp.models import stochastic

SINE_TEMPERATURE = 10000.0  # DETR
SINE_SCALE = 2 * math.pi  # DETR's normalize=True


def _interleave_sin_cos(angles: jnp.ndarray) -> jnp.ndarray:
  """[..., F] angles -> [..., F] as (sin a0, cos a1, sin a2, cos a3, ...) like DETR."""
  pairs = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
  return pairs.reshape(angles.shape)


def _frequencies(num_feats: int) -> jnp.ndarray:
  """[F] DETR's dim_t: temperature ** (2 * (i // 2) / F)."""
  i = jnp.arange(num_feats)
  return SINE_TEMPERATURE ** (2 * (i // 2) / num_feats)


def sine_position_embedding(mask: jnp.ndarray, num_feats: int) -> jnp.ndarray:
  """DETR's normalised PositionEmbeddingSine of a padded grid.

  Args:
    mask: [B, h, w] bool, True on real cells (top-left aligned).
    num_feats: features per axis (d_model / 2; must be even).

  Returns:
    [B, h, w, 2 * num_feats] float32: (y features, x features), each coordinate the
    cumulative count of real cells scaled so the last real cell maps to 2*pi.
  """
  m = mask.astype(jnp.float32)
  y = jnp.cumsum(m, axis=1)
  x = jnp.cumsum(m, axis=2)
  eps = 1e-6
  y = y / (y[:, -1:, :] + eps) * SINE_SCALE
  x = x / (x[:, :, -1:] + eps) * SINE_SCALE
  freqs = _frequencies(num_feats)
  return jnp.concatenate([_interleave_sin_cos(y[..., None] / freqs),
                          _interleave_sin_cos(x[..., None] / freqs)], axis=-1)


def point_sine_embedding(points: jnp.ndarray, num_feats: int) -> jnp.ndarray:
  """Sine embedding of normalised (x, y) points in the grid's convention.

  Args:
    points: [..., 2] (x, y) in [0, 1].
    num_feats: features per axis.

  Returns:
    [..., 2 * num_feats]: (y features, x features), a point at the image's far edge
    getting the same code as the last real grid cell.
  """
  freqs = _frequencies(num_feats)
  angles = points.astype(jnp.float32)[..., None] * SINE_SCALE / freqs  # [..., 2, F]
  return jnp.concatenate([_interleave_sin_cos(angles[..., 1, :]),
                          _interleave_sin_cos(angles[..., 0, :])], axis=-1)


def grid_mask(image_mask: jnp.ndarray, stride: int) -> jnp.ndarray:
  """[B, H, W] -> [B, ceil(H/S), ceil(W/S)]: a cell is real iff its top-left pixel is."""
  return image_mask[:, ::stride, ::stride]


def cell_centers(image_mask: jnp.ndarray, grid_shape: tuple[int, int],
                 stride: int) -> jnp.ndarray:
  """Cell centres in target-box coordinates.

  Args:
    image_mask: [B, H, W] bool; the real image is the top-left rectangle.
    grid_shape: (h, w) of the feature map.
    stride: pixels per cell.

  Returns:
    [B, h * w, 2] (cx, cy) divided by the real (unpadded) width / height, row-major.
  """
  h, w = grid_shape
  real_h = jnp.maximum(image_mask[:, :, 0].sum(axis=1), 1).astype(jnp.float32)
  real_w = jnp.maximum(image_mask[:, 0, :].sum(axis=1), 1).astype(jnp.float32)
  cx = (jnp.arange(w) + 0.5) * stride / real_w[:, None]  # [B, w]
  cy = (jnp.arange(h) + 0.5) * stride / real_h[:, None]  # [B, h]
  b = image_mask.shape[0]
  centers = jnp.stack([jnp.broadcast_to(cx[:, None, :], (b, h, w)),
                       jnp.broadcast_to(cy[:, :, None], (b, h, w))], axis=-1)
  return centers.reshape(b, h * w, 2)


def _embed(num: int, features: int, names: layers.Names, dtype: jnp.dtype,
           name: str | None = None) -> nn.Embed:
  return nn.Embed(num, features, dtype=dtype, param_dtype=layers.PARAM_DTYPE,
                  embedding_init=layers.partitioned(layers.BERT_INIT, names), name=name)


class TextEmbeddings(nn.Module):
  """BERT embeddings: word + position + token type 0, LayerNorm, dropout.

  Also owns the word table used by the caption decoder and the tied output layers.
  """
  vocab_size: int
  max_len: int
  type_vocab_size: int
  d_model: int
  epsilon: float
  dropout: float
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.word_embeddings = _embed(self.vocab_size, self.d_model, ('vocab', 'embed'), self.dtype)
    self.position_embeddings = _embed(
        self.max_len, self.d_model, ('position', 'embed'), self.dtype)
    self.token_type_embeddings = _embed(
        self.type_vocab_size, self.d_model, (None, 'embed'), self.dtype)
    self.LayerNorm = layers.layer_norm(self.epsilon, dtype=self.dtype)  # HF BERT name
    self.drop = stochastic.Dropout(self.dropout)

  def __call__(self, ids: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """[B, L] ids -> [B, L, D]."""
    length = ids.shape[1]
    x = (self.word_embeddings(ids)
         + self.position_embeddings(jnp.arange(length))[None]
         + self.token_type_embeddings(jnp.zeros_like(ids)))
    x = self.drop(self.LayerNorm(x), deterministic=not train)
    return layers.constrain(x, layers.ACT_BLD)

  def embed_words(self, ids: jnp.ndarray) -> jnp.ndarray:
    """[...] ids -> [..., D] word vectors only (the caption decoder's input table)."""
    return self.word_embeddings(ids)

  def attend(self, x: jnp.ndarray) -> jnp.ndarray:
    """[..., D] -> [..., V]: x @ word_embeddings.T (tied output layers)."""
    return self.word_embeddings.attend(x)


class VisualEmbeddings(nn.Module):
  """Backbone features -> encoder tokens, their padding mask, positions and cell centres.

  Attributes:
    stride: the backbone's output stride (pixels per cell).
  """
  d_model: int
  stride: int
  epsilon: float
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jnp.ndarray, image_mask: jnp.ndarray, *, train: bool
               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Embeds a feature grid.

    Args:
      features: [B, h, w, C] backbone output.
      image_mask: [B, H, W] bool, True on real pixels.
      train: enables dropout.

    Returns:
      tokens [B, N, D] (N = h * w, row-major), mask [B, N] bool, pos [B, N, D] (the
      sine embedding, also added to the cross-attention keys of the decoder) and
      cell_centers [B, N, 2].
    """
    if self.d_model % 4:
      raise ValueError(f'config.model.d_model={self.d_model} must be a multiple of 4 for '
                       'the 2-D sine position embedding (sin/cos pairs per axis).')
    b, h, w, _ = features.shape
    mask = grid_mask(image_mask, self.stride)
    if mask.shape[1:] != (h, w):
      raise ValueError(f'Feature grid {(h, w)} does not match image {image_mask.shape[1:]} '
                       f'at stride {self.stride}; the backbone and the stride disagree.')
    x = nn.Conv(
        self.d_model, (1, 1), dtype=self.dtype, param_dtype=layers.PARAM_DTYPE,
        kernel_init=layers.partitioned(
            nn.initializers.xavier_uniform(), ('conv_kernel', None, 'conv_in', 'embed')),
        bias_init=layers.partitioned(nn.initializers.zeros, ('embed',)),
        name='projection')(features)
    pos = sine_position_embedding(mask, self.d_model // 2)
    modality = self.param('modality_embedding',
                          layers.partitioned(layers.BERT_INIT, ('embed',)), (self.d_model,),
                          layers.PARAM_DTYPE)
    x = x + pos.astype(self.dtype) + modality.astype(self.dtype)
    x = layers.layer_norm(self.epsilon, dtype=self.dtype, name='LayerNorm')(x)
    x = stochastic.Dropout(self.dropout)(x, deterministic=not train)
    n = h * w
    tokens = layers.constrain(x.reshape(b, n, self.d_model), layers.ACT_BLD)
    centers = cell_centers(image_mask, (h, w), self.stride)
    return tokens, mask.reshape(b, n), pos.reshape(b, n, self.d_model), centers


class CaptionEmbeddings(nn.Module):
  """Caption decoder input: (shared) word vectors + learned positions, LayerNorm, dropout.

  With `decode='init'` it creates a 'cache' variable `position_index` (0); with
  `decode='step'` the tokens sit at positions index.. index + T - 1 and the index moves.
  """
  max_len: int
  d_model: int
  epsilon: float
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, word_vectors: jnp.ndarray, *, train: bool,
               decode: str | None = None) -> jnp.ndarray:
    """[B, T, D] word vectors -> [B, T, D]."""
    length = word_vectors.shape[1]
    start = 0
    if decode is not None:
      if decode == 'step' and not self.has_variable('cache', 'position_index'):
        raise ValueError('No caption cache: run E2EVLP.init_caption_cache with '
                         "mutable=['cache'] and pass its 'cache' collection to caption_step.")
      index = self.variable('cache', 'position_index', lambda: jnp.array(0, jnp.int32))
      if decode == 'step':
        start = index.value
        index.value = start + length
    table = _embed(self.max_len, self.d_model, ('position', 'embed'), self.dtype,
                   name='position_embeddings')
    x = word_vectors + table(start + jnp.arange(length))[None]
    x = layers.layer_norm(self.epsilon, dtype=self.dtype, name='LayerNorm')(x)
    return stochastic.Dropout(self.dropout)(x, deterministic=not train)


def _uniform_logit(key: jax.Array, shape: tuple[int, ...],
                   dtype: jnp.dtype = jnp.float32) -> jnp.ndarray:
  """Logits whose sigmoid is uniform over (0, 1): reference points cover the image."""
  u = jax.random.uniform(key, shape, dtype, minval=1e-3, maxval=1 - 1e-3)
  return jnp.log(u) - jnp.log1p(-u)


class QueryEmbeddings(nn.Module):
  """Object queries for the detection decoder.

  reference_points=False: DETR's learned query position embeddings (`query_embed`).
  reference_points=True: a learned 2-D point per query (`reference_points`, logits) and
  the query position = MLP(sine(point)) (`ref_point_head`, as in Conditional/DAB-DETR).
  """
  num_queries: int
  d_model: int
  reference_points: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Returns query_pos [Q, D] and reference points [Q, 2] (x, y) in (0, 1) or None."""
    if not self.reference_points:
      pos = self.param('query_embed',
                       layers.partitioned(nn.initializers.normal(1.0), ('queries', 'embed')),
                       (self.num_queries, self.d_model), layers.PARAM_DTYPE)
      return pos.astype(self.dtype), None
    logits = self.param('reference_points', layers.partitioned(_uniform_logit, ('queries', None)),
                        (self.num_queries, 2), layers.PARAM_DTYPE)
    points = jax.nn.sigmoid(logits)
    sine = point_sine_embedding(points, self.d_model // 2).astype(self.dtype)
    pos = layers.MLP(self.d_model, self.d_model, 2, dtype=self.dtype, out_name='embed',
                     name='ref_point_head')(sine)
    return pos, points
