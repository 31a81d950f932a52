"""Caption decoding inside `jax.jit`: greedy and beam search over the KV-cached decoder.

Works with any flax module exposing the caption-cache protocol of `E2EVLP` (see the top of
e2e_vlp/models/e2e_vlp.py): `encode_image`, `init_caption_cache`, `caption_step`, and
`caption_logits` for the uncached reference. Beam search asks `init_caption_cache` for k
hypotheses per image: the self-attention cache leaves then have B * k rows, reordered with
one `jnp.take` per leaf each step, while the cross-attention caches keep one row per image
(B rows, shared by its beams, never reordered) and int32 scalars hold the shared position.

Conventions shared by all decoders:
  * Outputs are the tokens after [BOS], [B, max_len] int32; the [EOS] is kept and every
    position after it holds `pad_id`. A sequence without [EOS] uses all max_len tokens.
  * A hypothesis' length counts its generated tokens, [EOS] included.
  * Beam scores use the GNMT length penalty: log P(y) / ((5 + |y|) / 6) ** alpha.

The jitted functions take the module as a static argument: models that compare equal
(same class and config) share compiled code; the active `nn.logical_axis_rules` are part
of the compile key, so sharding hints never go stale.
"""

import functools
from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

Variables = Mapping[str, Any]
Cache = Any  # the 'cache' collection (a nested mapping of arrays)


class CaptionTokenizer(Protocol):
  """The special ids decoding needs (e2e_vlp.data.tokenizer.Tokenizer has them)."""
  bos_id: int
  eos_id: int
  pad_id: int


class _Static:
  """Hashable handle on a flax module for `jax.jit` static arguments.

  Linen modules holding a ConfigDict cannot be hashed, but they compare by value; hashing
  on the class keeps equal modules in one bucket and `==` tells them apart.
  """

  def __init__(self, module: nn.Module):
    self.module = module

  def __hash__(self) -> int:
    return hash(type(self.module))

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, _Static) and type(other.module) is type(self.module)
            and other.module == self.module)


def _freeze(x: Any) -> Any:
  """Lists -> tuples, recursively (logical axis rules may be given as lists)."""
  return tuple(_freeze(e) for e in x) if isinstance(x, (list, tuple)) else x


def _static_kwargs(model: nn.Module) -> dict[str, Any]:
  """The compile key beyond shapes: the module and the active logical axis rules."""
  return {'model': _Static(model), 'rules': _freeze(nn.get_logical_axis_rules())}


def _check_ids(vocab_size: int, **ids: int):
  """Trace-time check that special token ids index the model's vocabulary."""
  for name, value in ids.items():
    if not 0 <= value < vocab_size:
      raise ValueError(f'{name}={value} is outside the model vocabulary [0, {vocab_size}); '
                       'pass the ids of the tokenizer the model was trained with.')


def _check_max_len(max_len: int):
  if max_len < 1:
    raise ValueError(f'max_len={max_len} must be at least 1 (tokens generated after [BOS]).')


def _encode(model: nn.Module, variables: Variables, image: jnp.ndarray,
            image_mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """-> memory [B, N, D], memory_mask [B, N], memory_pos [B, N, D]."""
  return model.apply(variables, image, image_mask, method='encode_image')


def _init_cache(model: nn.Module, variables: Variables, memory: jnp.ndarray,
                memory_mask: jnp.ndarray, memory_pos: jnp.ndarray, max_len: int,
                beams: int = 1) -> Cache:
  _, state = model.apply(variables, memory, memory_mask, memory_pos, max_len, beams,
                         method='init_caption_cache', mutable=['cache'])
  return state['cache']


def _step(model: nn.Module, variables: Variables, cache: Cache, tokens: jnp.ndarray
          ) -> tuple[jnp.ndarray, Cache]:
  """tokens [B] at the cached position -> next-token logits [B, V] float32, new cache."""
  logits, state = model.apply({**variables, 'cache': cache}, tokens[:, None],
                              method='caption_step', mutable=['cache'])
  return logits[:, 0].astype(jnp.float32), state['cache']


def _prefix_logits(module: nn.Module, variables: Variables, memory: Any, seqs: jnp.ndarray,
                   t: jnp.ndarray, bos_id: int) -> jnp.ndarray:
  """Next-token logits [N, V] after [BOS] seqs[:, :t] without a cache: `caption_logits`
  over the whole prefix. memory: `_encode`'s three arrays; seqs [N, max_len]."""
  caption_in = jnp.concatenate(
      [jnp.full((seqs.shape[0], 1), bos_id, jnp.int32), seqs[:, :-1]], axis=1)
  caption_mask = jnp.broadcast_to(jnp.arange(seqs.shape[1]) <= t, caption_in.shape)
  logits = module.apply(variables, *memory, caption_in, caption_mask, method='caption_logits')
  return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)


def _greedy_loop(next_logits, carry0, batch: int, *, bos_id: int, eos_id: int, max_len: int,
                 pad_id: int) -> jnp.ndarray:
  """Greedy decoding driven by `next_logits(t, carry, last [B], tokens) -> (logits, carry)`.

  Stops once every sequence has produced [EOS]. Returns tokens [B, max_len] int32.
  """

  def cond(state):
    t, _, _, _, done = state
    return (t < max_len) & ~jnp.all(done)

  def body(state):
    t, carry, tokens, last, done = state
    logits, carry = next_logits(t, carry, last, tokens)
    _check_ids(logits.shape[-1], bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    token = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
    return t + 1, carry, tokens, token, done | (token == eos_id)

  state = (jnp.int32(0), carry0, jnp.full((batch, max_len), pad_id, jnp.int32),
           jnp.full((batch,), bos_id, jnp.int32), jnp.zeros((batch,), jnp.bool_))
  return jax.lax.while_loop(cond, body, state)[2]


@functools.partial(jax.jit, static_argnames=('model', 'rules', 'bos_id', 'eos_id', 'max_len',
                                             'pad_id'))
def _greedy_jit(variables, image, image_mask, *, model, rules, bos_id, eos_id, max_len,
                pad_id):
  del rules  # only a compile key
  module = model.module
  memory, memory_mask, memory_pos = _encode(module, variables, image, image_mask)
  cache = _init_cache(module, variables, memory, memory_mask, memory_pos, max_len)

  def next_logits(t, cache, last, tokens):
    del t, tokens  # the cache holds the position and the prefix
    return _step(module, variables, cache, last)

  return _greedy_loop(next_logits, cache, image.shape[0], bos_id=bos_id, eos_id=eos_id,
                      max_len=max_len, pad_id=pad_id)


def greedy_decode(model: nn.Module, variables: Variables, image: jnp.ndarray,
                  image_mask: jnp.ndarray, *, bos_id: int, eos_id: int, max_len: int,
                  pad_id: int = 0) -> jnp.ndarray:
  """Greedy captions with the KV cache (one compiled loop).

  Args:
    model: an `E2EVLP` (or a module with the same caption-cache methods).
    variables: the model variables ({'params': ...}); no 'cache' needed.
    image: [B, H, W, 3] float; image_mask: [B, H, W] bool.
    max_len: tokens generated after [BOS], at most config.model.max_caption_len.

  Returns:
    tokens [B, max_len] int32: [EOS] kept, `pad_id` after it.
  """
  _check_max_len(max_len)
  return _greedy_jit(variables, image, image_mask, bos_id=bos_id, eos_id=eos_id,
                     max_len=max_len, pad_id=pad_id, **_static_kwargs(model))


@functools.partial(jax.jit, static_argnames=('model', 'rules', 'bos_id', 'eos_id', 'max_len',
                                             'pad_id'))
def _greedy_uncached_jit(variables, image, image_mask, *, model, rules, bos_id, eos_id,
                         max_len, pad_id):
  del rules  # only a compile key
  module = model.module
  memory = _encode(module, variables, image, image_mask)

  def next_logits(t, carry, last, tokens):
    del last  # the whole prefix is recomputed
    return _prefix_logits(module, variables, memory, tokens, t, bos_id), carry

  return _greedy_loop(next_logits, (), image.shape[0], bos_id=bos_id, eos_id=eos_id,
                      max_len=max_len, pad_id=pad_id)


def greedy_decode_uncached(model: nn.Module, variables: Variables, image: jnp.ndarray,
                           image_mask: jnp.ndarray, *, bos_id: int, eos_id: int, max_len: int,
                           pad_id: int = 0) -> jnp.ndarray:
  """`greedy_decode` without the cache: each step reruns `caption_logits` on the full
  [B, max_len] prefix (O(max_len^2) work); the reference for tests and benchmarks."""
  _check_max_len(max_len)
  return _greedy_uncached_jit(variables, image, image_mask, bos_id=bos_id, eos_id=eos_id,
                              max_len=max_len, pad_id=pad_id, **_static_kwargs(model))


def _length_penalty(length: jnp.ndarray, alpha: jnp.ndarray) -> jnp.ndarray:
  """GNMT (Wu et al., 2016): ((5 + length) / 6) ** alpha; 1 for alpha = 0."""
  return ((5.0 + length) / 6.0) ** alpha


def _top_k_gather(scores: jnp.ndarray, k: int, *others: jnp.ndarray
                  ) -> tuple[jnp.ndarray, ...]:
  """Best k along axis 1 of scores [B, N] (sorted, best first) and the same rows of
  each `other` [B, N, ...]."""
  top, index = jax.lax.top_k(scores, k)
  picked = tuple(jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)),
                                     axis=1) for x in others)
  return (top, index) + picked


def _beam_loop(next_logits, reorder, carry0, batch: int, alpha: jnp.ndarray, *, k: int,
               bos_id: int, eos_id: int, max_len: int, pad_id: int
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Beam search driven by `next_logits(t, carry, last [B*k], seqs [B*k, max_len]) ->
  (logits [B*k, V], carry)`; `reorder(carry, rows [B*k])` follows the surviving beams
  (row b * k + j is beam j of image b). Returns tokens [B, max_len] and scores [B]."""
  neg_inf = jnp.float32(-jnp.inf)
  rank = jnp.arange(2 * k)

  def cond(state):
    t, _, _, alive_logp, _, _, fin_scores = state
    # With alpha >= 0 no continuation of an alive beam can score above its log-prob so
    # far divided by the largest penalty; stop when none can enter a full finished set.
    best_possible = alive_logp[:, 0] / _length_penalty(max_len, alpha)
    worst_finished = fin_scores[:, -1]
    done = (worst_finished > neg_inf) & (worst_finished >= best_possible)
    return (t < max_len) & ~jnp.all(done)

  def body(state):
    t, carry, alive_seqs, alive_logp, last, fin_seqs, fin_scores = state
    logits, carry = next_logits(t, carry, last.reshape(-1),
                                alive_seqs.reshape(batch * k, max_len))
    vocab = logits.shape[-1]
    _check_ids(vocab, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    logp = jax.nn.log_softmax(logits).reshape(batch, k, vocab) + alive_logp[..., None]
    # 2k candidates always hold k that do not end (each beam has one [EOS] extension).
    cand_logp, cand_index = jax.lax.top_k(logp.reshape(batch, k * vocab), 2 * k)
    cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(alive_seqs, cand_beam[..., None], axis=1)
    cand_seqs = jax.lax.dynamic_update_slice(cand_seqs, cand_token[..., None], (0, 0, t))
    ends = cand_token == eos_id
    # An [EOS] finishes a hypothesis only when ranked among the k best candidates (as in
    # Hugging Face): with k = 1 this is exactly greedy decoding.
    new_scores = jnp.where(ends & (rank < k), cand_logp / _length_penalty(t + 1, alpha),
                           neg_inf)
    fin_scores, _, fin_seqs = _top_k_gather(
        jnp.concatenate([fin_scores, new_scores], axis=1), k,
        jnp.concatenate([fin_seqs, cand_seqs], axis=1))
    alive_logp, _, alive_seqs, beam, last = _top_k_gather(
        jnp.where(ends, neg_inf, cand_logp), k, cand_seqs, cand_beam, cand_token)
    carry = reorder(carry, (jnp.arange(batch)[:, None] * k + beam).reshape(-1))
    return t + 1, carry, alive_seqs, alive_logp, last, fin_seqs, fin_scores

  seqs = jnp.full((batch, k, max_len), pad_id, jnp.int32)
  state = (jnp.int32(0), carry0, seqs,
           jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf), (batch, k)),
           jnp.full((batch, k), bos_id, jnp.int32), seqs, jnp.full((batch, k), neg_inf))
  _, _, alive_seqs, alive_logp, _, fin_seqs, fin_scores = jax.lax.while_loop(cond, body, state)
  finished = fin_scores[:, 0] > neg_inf
  tokens = jnp.where(finished[:, None], fin_seqs[:, 0], alive_seqs[:, 0])
  alive_scores = alive_logp[:, 0] / _length_penalty(max_len, alpha)
  return tokens, jnp.where(finished, fin_scores[:, 0], alive_scores)


@functools.partial(jax.jit, static_argnames=('model', 'rules', 'bos_id', 'eos_id', 'max_len',
                                             'beam_size', 'pad_id', 'cached'))
def _beam_jit(variables, image, image_mask, alpha, *, model, rules, bos_id, eos_id, max_len,
              beam_size, pad_id, cached):
  del rules  # only a compile key
  module, k = model.module, beam_size
  memory = _encode(module, variables, image, image_mask)
  if cached:
    carry0 = _init_cache(module, variables, *memory, max_len, beams=k)
    next_logits = lambda t, cache, last, seqs: _step(module, variables, cache, last)
    # Only leaves with a row per hypothesis follow the beams; an image's rows (the
    # cross-attention caches) are the same for all of its beams. With k = 1 every
    # hypothesis stays in its row.
    reorder = lambda cache, rows: cache if k == 1 else jax.tree.map(
        lambda x: jnp.take(x, rows, axis=0) if x.ndim and x.shape[0] == rows.shape[0] else x,
        cache)
  else:  # every step reruns the caption decoder over each beam's whole prefix
    memory = [jnp.repeat(x, k, axis=0) for x in memory]
    carry0, reorder = (), lambda carry, rows: carry
    next_logits = lambda t, carry, last, seqs: (
        _prefix_logits(module, variables, memory, seqs, t, bos_id), carry)
  return _beam_loop(next_logits, reorder, carry0, image.shape[0], alpha, k=k, bos_id=bos_id,
                    eos_id=eos_id, max_len=max_len, pad_id=pad_id)


def beam_search(model: nn.Module, variables: Variables, image: jnp.ndarray,
                image_mask: jnp.ndarray, *, bos_id: int, eos_id: int, max_len: int,
                beam_size: int, length_penalty: float, pad_id: int = 0, cached: bool = True
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Beam search with the KV cache (self-attention caches gathered by beam each step; the
  image's cross-attention keys and values stored once, shared by its beams).

  Alive and finished hypotheses are kept apart (k of each); a hypothesis finishes when
  its [EOS] ranks among the k best candidates of the step. The search stops early when no
  alive beam can still beat the k-th finished one.

  Args:
    model, variables, image, image_mask, max_len: as in `greedy_decode`.
    beam_size: k >= 1; k = 1 with length_penalty = 0 is greedy decoding.
    length_penalty: GNMT alpha >= 0; 0 ranks by the raw log-prob sum, larger values
      favour longer captions.
    cached: False reruns the caption decoder over each beam's whole prefix every step
      instead (O(max_len^2) work, no cache): the reference for tests and benchmarks.

  Returns:
    tokens [B, max_len] int32 (as greedy) and scores [B] float32: the best finished
    hypothesis and its score log P / ((5 + len) / 6) ** alpha, or, when none finished
    within max_len, the best alive one scored with len = max_len.
  """
  _check_max_len(max_len)
  if beam_size < 1:
    raise ValueError(f'beam_size={beam_size} must be at least 1.')
  if not length_penalty >= 0:
    raise ValueError(f'length_penalty={length_penalty} must be >= 0 (GNMT alpha; 0 = raw '
                     'log-probability); the early stop assumes penalties grow with length.')
  return _beam_jit(variables, image, image_mask, jnp.float32(length_penalty), bos_id=bos_id,
                   eos_id=eos_id, max_len=max_len, beam_size=beam_size, pad_id=pad_id,
                   cached=cached, **_static_kwargs(model))


def greedy_captions(model: nn.Module, variables: Variables, image: jnp.ndarray,
                    image_mask: jnp.ndarray, tokenizer: CaptionTokenizer, *, max_len: int
                    ) -> jnp.ndarray:
  """`greedy_decode` with the tokenizer's [BOS] / [EOS] / [PAD] ids -> tokens [B, max_len]
  (feed `np.asarray(tokens)` to `tokenizer.detokenize`)."""
  return greedy_decode(model, variables, image, image_mask, bos_id=tokenizer.bos_id,
                       eos_id=tokenizer.eos_id, max_len=max_len, pad_id=tokenizer.pad_id)
