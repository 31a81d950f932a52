"""Transformer layers: the BERT-layout cross-modal encoder and the DETR-style decoder.

Encoder names mirror Hugging Face BERT (`layer_{i}/attention/self/{query,key,value}`,
`attention/output/{dense,LayerNorm}`, `intermediate/dense`, `output/{dense,LayerNorm}`);
q/k/v kernels are [embed, heads, kv] and the attention output kernel [heads, kv, embed],
so a BERT [in, out] kernel imports by a reshape. Decoder names mirror DETR
(`layers_{i}/{self_attn, multihead_attn, linear1, linear2, norm1, norm2, norm3}`, `norm`).

Autoregressive decoding (caption path) uses the flax 'cache' collection, driven by a
`decode` mode: None (no cache), 'init' (create the cache; self-attention caches start
empty, cross-attention caches store the memory's projected keys/values and mask) or
'step' (attend over the cache and append the new keys/values).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2e_vlp.models import layers
from e2e_vlp.models import stochastic

DECODE_MODES = (None, 'init', 'step')


class Attention(nn.Module):
  """Multi-head scaled dot-product attention with q/k/v projections.

  Attributes:
    num_heads: number of heads (d_model must divide evenly).
    dropout_rate: dropout on the attention probabilities (train only).
    out_features: if set, an `out_proj` [heads, kv, out] is applied (DETR); if None the
      per-head context [B, T, H, K] is returned (BERT keeps its output dense elsewhere).
    cache_kind: 'self' (causal, appended per step) or 'cross' (static memory).
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  dropout_rate: float = 0.0
  out_features: int | None = None
  cache_kind: str = 'self'

  @nn.compact
  def __call__(self, inputs_q: jnp.ndarray, inputs_k: jnp.ndarray | None,
               inputs_v: jnp.ndarray | None, mask: jnp.ndarray | None, *,
               deterministic: bool, decode: str | None = None) -> jnp.ndarray:
    """Attends `inputs_q` [B, T, D] to `inputs_k`/`inputs_v` [B, S, D] (a 'cross'
    attention also takes queries [R * B, T, D], R hypotheses per memory row).

    Args:
      mask: bool, broadcastable to [B, H, T, S]; False entries are ignored. Fully
        masked rows give a uniform average of the values (finite).
      decode: see the module docstring; in 'step' mode a 'cross' cache ignores
        inputs_k, inputs_v and mask (they come from the cache).

    Returns:
      [B, T, H, K] or [B, T, out_features].
    """
    d = inputs_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'd_model={d} is not divisible by num_heads={self.num_heads}.')
    if decode not in DECODE_MODES:
      raise ValueError(f'decode={decode!r}; use one of {DECODE_MODES}.')
    head_dim = d // self.num_heads

    def proj(name):
      return layers.DenseGeneral((self.num_heads, head_dim), ('embed',), ('heads', 'kv'),
                                 dtype=self.dtype, name=name)

    query = proj('query')(inputs_q)
    if decode == 'step' and self.cache_kind == 'cross':
      key, value, mask = self._read_cross_cache()
    else:
      key, value = proj('key')(inputs_k), proj('value')(inputs_v)
      if decode == 'init' and self.cache_kind == 'cross':
        self._write_cross_cache(key, value, mask)
      elif decode is not None:
        key, value, mask = self._self_cache(key, value, mask, decode)

    rows = query.shape[0]
    query = self._fold_hypotheses(query, key.shape[0])
    # flax's nn.dot_product_attention with its dropout (not broadcast), the keep mask drawn
    # by stochastic.bernoulli: the same values, one fused loop on CPU.
    weights = nn.dot_product_attention_weights(
        query, key, mask=mask, deterministic=True, dtype=self.dtype,
        force_fp32_for_softmax=True)
    if not deterministic and self.dropout_rate > 0:
      keep_prob = 1.0 - self.dropout_rate
      keep = stochastic.bernoulli(self.make_rng('dropout'), keep_prob, weights.shape)
      weights = weights * (keep.astype(weights.dtype) / jnp.asarray(keep_prob, weights.dtype))
    x = jnp.einsum('...hqk,...khd->...qhd', weights, value)
    if x.shape[0] != rows:  # unfold the hypotheses, the memory rows' batch sharding kept
      x = layers.constrain(x, layers.ACT_BLHK).reshape((rows, -1) + x.shape[2:])
    x = layers.constrain(x.astype(self.dtype), layers.ACT_BLHK)
    if self.out_features is None:
      return x
    return layers.DenseGeneral((self.out_features,), ('heads', 'kv'), ('embed',),
                               dtype=self.dtype, name='out_proj')(x)

  def _fold_hypotheses(self, query: jnp.ndarray, memory_rows: int) -> jnp.ndarray:
    """query [R * M, T, H, K] -> [M, R * T, H, K] when a cross-attention memory has
    M = `memory_rows` rows: beam search's R hypotheses of an image (rows r * R .. r * R + R - 1)
    attend to its one memory row as R * T queries, so the memory's keys and values are
    neither tiled per beam nor reordered each step. Exact: cross-attention queries are
    independent of each other."""
    rows = query.shape[0]
    if rows == memory_rows:
      return query
    if self.cache_kind != 'cross' or rows % memory_rows:
      raise ValueError(f'{rows} query rows against {memory_rows} key rows: only a '
                       "cross-attention ('cross' cache_kind) may have a multiple of its "
                       "memory's rows (beam hypotheses sharing an image).")
    # Constrained like the attention's other activations: without it, a batch that the
    # data axes do not divide left XLA's partitioner resharding by full rematerialisation.
    return layers.constrain(query.reshape((memory_rows, -1) + query.shape[2:]),
                            layers.ACT_BLHK)

  def _missing_cache(self) -> ValueError:
    return ValueError('No caption cache: run E2EVLP.init_caption_cache with '
                      "mutable=['cache'] and pass its 'cache' collection to caption_step.")

  def _write_cross_cache(self, key, value, mask):
    if mask is None:
      raise ValueError('A cross-attention cache needs the memory mask.')
    mask = jnp.broadcast_to(mask, (key.shape[0], 1, 1, key.shape[1]))
    for name, array in (('cached_key', key), ('cached_value', value), ('cached_mask', mask)):
      self.put_variable('cache', name, array)

  def _read_cross_cache(self):
    if not self.has_variable('cache', 'cached_key'):
      raise self._missing_cache()
    return tuple(self.get_variable('cache', n)
                 for n in ('cached_key', 'cached_value', 'cached_mask'))

  def _self_cache(self, key, value, mask, decode):
    """Causal self-attention cache [B, max_len, H, K] written at `cache_index`."""
    if decode == 'step' and not self.has_variable('cache', 'cached_key'):
      raise self._missing_cache()
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
    index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    if decode == 'init':
      return key, value, mask
    start = index.value
    length = key.shape[1]
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, start, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value, (0, start, 0, 0))
    index.value = start + length
    max_len = cached_key.value.shape[1]
    causal = jnp.arange(max_len)[None, :] <= (start + jnp.arange(length))[:, None]
    return cached_key.value, cached_value.value, causal[None, None]


class BertOutput(nn.Module):
  """BERT's `output`: dense -> dropout -> LayerNorm(residual + .)."""
  d_model: int
  in_names: tuple[str, ...]
  epsilon: float
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, residual: jnp.ndarray, deterministic: bool
               ) -> jnp.ndarray:
    """x [B, L, *in] + residual [B, L, D] -> [B, L, D]."""
    y = layers.DenseGeneral((self.d_model,), tuple(self.in_names), ('embed',),
                            dtype=self.dtype, name='dense')(x)
    y = stochastic.Dropout(self.dropout)(y, deterministic=deterministic)
    y = layers.layer_norm(self.epsilon, dtype=self.dtype, name='LayerNorm')(y + residual)
    return layers.constrain(y, layers.ACT_BLD)


class BertAttention(nn.Module):
  """BERT's `attention`: `self` (q/k/v + attention) and `output` (dense + LayerNorm)."""
  d_model: int
  num_heads: int
  epsilon: float
  dropout: float
  attention_dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    """[B, L, D] -> [B, L, D]; mask [B, 1, 1, L] bool on keys."""
    ctx = Attention(self.num_heads, self.dtype, self.attention_dropout, name='self')(
        x, x, x, mask, deterministic=deterministic)
    return BertOutput(self.d_model, ('heads', 'kv'), self.epsilon, self.dropout, self.dtype,
                      name='output')(ctx, x, deterministic)


class EncoderLayer(nn.Module):
  """A post-LayerNorm BERT layer with exact (erf) GELU."""
  d_model: int
  num_heads: int
  mlp_dim: int
  epsilon: float
  dropout: float
  attention_dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    """[B, L, D] -> [B, L, D]; mask [B, 1, 1, L] bool on keys."""
    x = BertAttention(self.d_model, self.num_heads, self.epsilon, self.dropout,
                      self.attention_dropout, self.dtype, name='attention')(
                          x, mask, deterministic)
    inter = IntermediateDense(self.mlp_dim, self.dtype, name='intermediate')(x)
    return BertOutput(self.d_model, ('mlp',), self.epsilon, self.dropout, self.dtype,
                      name='output')(inter, x, deterministic)


class IntermediateDense(nn.Module):
  """BERT's `intermediate`: dense to mlp_dim + exact GELU."""
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, L, D] -> [B, L, F]."""
    y = layers.dense(self.mlp_dim, ('embed', 'mlp'), dtype=self.dtype, name='dense')(x)
    return layers.constrain(nn.gelu(y, approximate=False), layers.ACT_BLM)


class Encoder(nn.Module):
  """A stack of `num_layers` BERT layers `layer_{i}` (optionally rematerialised)."""
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  epsilon: float
  dropout: float
  attention_dropout: float
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, *, deterministic: bool
               ) -> jnp.ndarray:
    """x [B, S, D], mask [B, S] bool (True = real token) -> [B, S, D]."""
    layer_cls = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat else EncoderLayer
    attn_mask = mask[:, None, None, :]
    for i in range(self.num_layers):
      x = layer_cls(self.d_model, self.num_heads, self.mlp_dim, self.epsilon, self.dropout,
                    self.attention_dropout, self.dtype, name=f'layer_{i}')(
                        x, attn_mask, deterministic)
    return x


def _with_pos(x: jnp.ndarray | None, pos: jnp.ndarray | None) -> jnp.ndarray | None:
  return x if x is None or pos is None else x + pos.astype(x.dtype)


class DecoderLayer(nn.Module):
  """DETR's post-norm decoder layer: self-attn, cross-attn to memory, ReLU FFN.

  Queries and self-attention keys get `query_pos`; cross-attention keys get `memory_pos`.
  """
  d_model: int
  num_heads: int
  mlp_dim: int
  epsilon: float
  dropout: float
  attention_dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tgt, query_pos, memory, memory_pos, self_mask, cross_mask,
               deterministic: bool, decode: str | None = None) -> jnp.ndarray:
    """tgt [B, T, D], memory [B, S, D] (None in 'step' mode) -> [B, T, D]."""
    drop = lambda y: stochastic.Dropout(self.dropout)(y, deterministic=deterministic)
    norm = lambda name: layers.layer_norm(self.epsilon, dtype=self.dtype, name=name)
    attn = lambda name, kind: Attention(
        self.num_heads, self.dtype, self.attention_dropout, self.d_model, kind, name=name)
    q = _with_pos(tgt, query_pos)
    h = attn('self_attn', 'self')(q, q, tgt, self_mask, deterministic=deterministic,
                                  decode=decode)
    tgt = norm('norm1')(tgt + drop(h))
    h = attn('multihead_attn', 'cross')(
        _with_pos(tgt, query_pos), _with_pos(memory, memory_pos), memory, cross_mask,
        deterministic=deterministic, decode=decode)
    tgt = norm('norm2')(tgt + drop(h))
    h = layers.dense(self.mlp_dim, ('embed', 'mlp'), dtype=self.dtype, name='linear1')(tgt)
    h = layers.constrain(nn.relu(h), layers.ACT_BLM)
    h = layers.dense(self.d_model, ('mlp', 'embed'), dtype=self.dtype, name='linear2')(drop(h))
    return layers.constrain(norm('norm3')(tgt + drop(h)), layers.ACT_BLD)


class Decoder(nn.Module):
  """`num_layers` DETR decoder layers `layers_{i}` and one final LayerNorm `norm`."""
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  epsilon: float
  dropout: float
  attention_dropout: float
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tgt, query_pos, memory, memory_pos, self_mask, cross_mask, *,
               deterministic: bool, decode: str | None = None, return_all: bool = True
               ) -> jnp.ndarray:
    """Decodes `tgt` [B, T, D] against `memory` [B, S, D].

    Args:
      query_pos: [B or 1, T, D] or None. memory_pos: [B, S, D] or None.
      self_mask / cross_mask: bool, broadcastable to [B, H, T, T] / [B, H, T, S].
      return_all: stack the normed output of every layer ([L, B, T, D], for auxiliary
        losses) instead of only the last ([B, T, D]).
    """
    remat = self.remat and decode is None  # the cache is written in place; no backward
    layer_cls = nn.remat(DecoderLayer, static_argnums=(7, 8)) if remat else DecoderLayer
    norm = layers.layer_norm(self.epsilon, dtype=self.dtype, name='norm')
    outputs = []
    for i in range(self.num_layers):
      tgt = layer_cls(self.d_model, self.num_heads, self.mlp_dim, self.epsilon, self.dropout,
                      self.attention_dropout, self.dtype, name=f'layers_{i}')(
                          tgt, query_pos, memory, memory_pos, self_mask, cross_mask,
                          deterministic, decode)
      if return_all:
        outputs.append(norm(tgt))
    return jnp.stack(outputs) if return_all else norm(tgt)
