"""Caption decoding: the cache against full recomputation, beam search against brute force."""

import itertools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from e2e_vlp import decoding
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.train import mesh as mesh_lib
from e2e_vlp.train import sharding

# Any ids do for a random model; with these, image 0's greedy caption ends after 4
# tokens and image 1's never ends (it repeats one token), so both cases are covered.
EOS, BOS, PAD = 3, 1, 0
MAX_LEN = 8
VOCAB = 6  # small enough to enumerate every caption of length <= 3


def _tiny_config():
  c = pretrain.get_config('tiny').model
  c.d_model, c.num_heads, c.mlp_dim = 32, 4, 64
  c.encoder_layers = c.decoder_layers = c.caption_decoder_layers = c.fusion_layers = 1
  c.vocab_size, c.num_queries, c.num_classes, c.num_attributes = VOCAB, 4, 3, 4
  c.backbone.stage_sizes, c.backbone.width = (1, 1), 8  # output stride 4: 4x4 cells
  return c


def _random_variables(model, image, image_mask, rng):
  """Variables drawn with numpy on the shapes of `model.init` (no init compile): unit
  LayerNorm / frozen-BN statistics, He-normal convolutions, N(0, 0.02) elsewhere except
  N(0, 1) word / caption-position embeddings and cross-attention kernels. Those make the
  next-token distributions peaked and dependent on the prefix, the position and the
  image, so hypotheses clearly differ."""

  def init(m, image, image_mask, caption):
    memory = m.encode_image(image, image_mask)
    return m.caption_logits(*memory, caption, jnp.ones(caption.shape, bool))

  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), image, image_mask, jnp.zeros((image.shape[0], 2), jnp.int32),
      method=init))

  def draw(path, x):
    name, leaf = jax.tree_util.keystr(path), path[-1].key
    if leaf in ('scale', 'var'):
      return jnp.ones(x.shape, x.dtype)
    if leaf in ('bias', 'mean'):
      return jnp.zeros(x.shape, x.dtype)
    std = 0.02
    if len(x.shape) == 4:
      std = np.sqrt(2.0 / np.prod(x.shape[:-1]))
    elif ('word_embeddings' in name or ('caption_embeddings' in name and 'position' in name)
          or ('multihead_attn' in name and 'kernel' in name)):
      std = 1.0
    return jnp.asarray(rng.normal(size=x.shape) * std, x.dtype)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes))


@pytest.fixture(scope='module')
def setup():
  """The tiny model, its variables, two images (one half padded), and `teacher(seqs
  [B, S, T]) -> [B, S, T, V]`, the oracle: log-probabilities of the next token after
  [BOS] seqs[b, s, :t] from the uncached teacher-forced `caption_logits`."""
  model = E2EVLP(_tiny_config())
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  image_mask = jnp.ones((2, 16, 16), bool).at[1, :, 10:].set(False)
  variables = _random_variables(model, image, image_mask, rng)

  @jax.jit
  def logprobs(seqs):
    b, s, t = seqs.shape
    memory = model.apply(variables, image, image_mask, method='encode_image')
    memory = [jnp.repeat(x, s, axis=0) for x in memory]
    flat = seqs.reshape(b * s, t)
    caption_in = jnp.concatenate([jnp.full((b * s, 1), BOS, jnp.int32), flat[:, :-1]], 1)
    logits = model.apply(variables, *memory, caption_in, jnp.ones(caption_in.shape, bool),
                         method='caption_logits')
    return jax.nn.log_softmax(logits).reshape(b, s, t, -1)

  return types.SimpleNamespace(
      model=model, variables=variables, image=image, image_mask=image_mask,
      teacher=lambda seqs: np.asarray(logprobs(jnp.asarray(seqs, jnp.int32))))


def _token_logprobs(logprobs, seqs):
  """[B, S, T, V], seqs [B, S, T] -> log P of each token of seqs [B, S, T]."""
  return np.take_along_axis(logprobs, seqs[..., None], axis=-1)[..., 0]


def _gnmt(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def _caption_length(row):
  """Generated tokens up to and including [EOS] (all of them without [EOS])."""
  return list(row).index(EOS) + 1 if EOS in row else len(row)


def test_cached_greedy_matches_recomputation(setup):
  model, variables, image, image_mask = (
      setup.model, setup.variables, setup.image, setup.image_mask)
  kw = dict(bos_id=BOS, eos_id=EOS, max_len=MAX_LEN, pad_id=PAD)
  cached = np.asarray(decoding.greedy_decode(model, variables, image, image_mask, **kw))
  full = np.asarray(
      decoding.greedy_decode_uncached(model, variables, image, image_mask, **kw))
  np.testing.assert_array_equal(cached, full)
  assert cached.shape == (2, MAX_LEN) and cached.dtype == np.int32
  lengths = [_caption_length(row) for row in cached]
  for row, length in zip(cached, lengths):  # after [EOS] only padding
    np.testing.assert_array_equal(row[length:], [PAD] * (MAX_LEN - length))
  # Every token up to [EOS] is the teacher-forced argmax given the tokens before it.
  argmax = setup.teacher(cached[:, None]).argmax(-1)[:, 0]
  for row, best, length in zip(cached, argmax, lengths):
    np.testing.assert_array_equal(row[:length], best[:length])


def test_beam_size_one_is_greedy(setup):
  model, variables, image, image_mask = (
      setup.model, setup.variables, setup.image, setup.image_mask)
  kw = dict(bos_id=BOS, eos_id=EOS, max_len=MAX_LEN, pad_id=PAD)
  greedy = np.asarray(decoding.greedy_decode(model, variables, image, image_mask, **kw))
  tokens, scores = decoding.beam_search(model, variables, image, image_mask, beam_size=1,
                                        length_penalty=0.0, **kw)
  np.testing.assert_array_equal(np.asarray(tokens), greedy)
  # Scores: the log-prob sums (alpha = 0), over all max_len tokens for the unfinished row.
  logp = _token_logprobs(setup.teacher(greedy[:, None]), greedy[:, None])[:, 0]
  expected = [lp[:_caption_length(row)].sum() for lp, row in zip(logp, greedy)]
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)


def test_cached_beam_matches_recomputation(setup):
  """The KV-cached beam search and the one that reruns the decoder over each prefix pick
  the same hypotheses with the same scores (k = 3, alpha = 0.6)."""
  kw = dict(bos_id=BOS, eos_id=EOS, max_len=MAX_LEN, pad_id=PAD, beam_size=3,
            length_penalty=0.6)
  args = (setup.model, setup.variables, setup.image, setup.image_mask)
  tokens, scores = decoding.beam_search(*args, **kw)
  full_tokens, full_scores = decoding.beam_search(*args, **kw, cached=False)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(full_tokens))
  np.testing.assert_allclose(np.asarray(scores), np.asarray(full_scores), rtol=1e-5,
                             atol=1e-5)
  assert np.isfinite(np.asarray(scores)).all()


@pytest.mark.parametrize('mesh_shape,strategy', [({'data': 8, 'fsdp': 1, 'model': 1}, 'dp'),
                                                 ({'data': 2, 'fsdp': 2, 'model': 2}, 'fsdp_tp')])
def test_beam_search_on_a_mesh_matches_one_device(setup, mesh_shape, strategy):
  """On 8 devices, with 2 images that the data axes do not divide, the folded
  cross-attention gives the one-device hypotheses and scores."""
  kw = dict(bos_id=BOS, eos_id=EOS, max_len=MAX_LEN, pad_id=PAD, beam_size=3,
            length_penalty=0.6)
  args = (setup.model, setup.variables, setup.image, setup.image_mask)
  tokens, scores = decoding.beam_search(*args, **kw)
  with jax.set_mesh(mesh_lib.make_mesh(mesh_shape)), nn.logical_axis_rules(
      sharding.logical_axis_rules(strategy)):
    mesh_tokens, mesh_scores = decoding.beam_search(*args, **kw)
  np.testing.assert_array_equal(np.asarray(mesh_tokens), np.asarray(tokens))
  np.testing.assert_allclose(np.asarray(mesh_scores), np.asarray(scores), rtol=1e-5,
                             atol=1e-5)


def test_greedy_captions_uses_tokenizer_ids(setup):
  model, variables, image, image_mask = (
      setup.model, setup.variables, setup.image, setup.image_mask)
  tokenizer = types.SimpleNamespace(bos_id=BOS, eos_id=EOS, pad_id=PAD)
  before = decoding._greedy_jit._cache_size()  # pylint: disable=protected-access
  # An equal but distinct model object reuses the compiled decoder.
  tokens = decoding.greedy_captions(E2EVLP(_tiny_config()), variables, image, image_mask,
                                    tokenizer, max_len=MAX_LEN)
  np.testing.assert_array_equal(
      tokens, decoding.greedy_decode(model, variables, image, image_mask, bos_id=BOS,
                                     eos_id=EOS, max_len=MAX_LEN, pad_id=PAD))
  assert decoding._greedy_jit._cache_size() == before  # pylint: disable=protected-access


def test_full_beam_is_exact(setup):
  """With a beam as wide as every alive prefix (5^2 * 6 = 150 candidates at the last
  step), beam search must return the best of all captions enumerated by brute force:
  those ending in [EOS] within max_len, scored log P / gnmt(length, alpha)."""
  model, variables, image, image_mask = (
      setup.model, setup.variables, setup.image, setup.image_mask)
  max_len = 3
  seqs = np.array(list(itertools.product(range(VOCAB), repeat=max_len)))
  both = np.broadcast_to(seqs, (2,) + seqs.shape)
  cum = np.cumsum(_token_logprobs(setup.teacher(both), both), axis=-1)
  for alpha in (0.0, 1.0):
    tokens, scores = decoding.beam_search(model, variables, image, image_mask, bos_id=BOS,
                                          eos_id=EOS, max_len=max_len, beam_size=150,
                                          length_penalty=alpha, pad_id=PAD)
    for b in range(2):
      best_score, best_seq = -np.inf, None
      for s, seq in enumerate(seqs):
        for length in range(1, max_len + 1):
          if seq[length - 1] == EOS and EOS not in seq[:length - 1]:
            score = cum[b, s, length - 1] / _gnmt(length, alpha)
            if score > best_score:
              best_score = score
              best_seq = list(seq[:length]) + [PAD] * (max_len - length)
      np.testing.assert_array_equal(np.asarray(tokens[b]), best_seq)
      np.testing.assert_allclose(float(scores[b]), best_score, rtol=1e-5, atol=1e-5)
  # That the length penalty changes the choice is shown on the hand-made model below (a
  # random model's preference depended on numerical details of the network).


A = 2  # the one ordinary word of the hand-made models below


class _MarkovCore(nn.Module):
  """Next-token logits table[position][last token]; caches the position."""
  table: tuple[tuple[tuple[float, ...], ...], ...]

  @nn.compact
  def __call__(self, tokens: jnp.ndarray | None) -> jnp.ndarray | None:
    position = self.variable('cache', 'position', lambda: jnp.array(0, jnp.int32))
    if tokens is None:  # init_caption_cache: the cache only
      return None
    logits = jnp.asarray(self.table)[position.value][tokens[:, 0]]
    position.value += 1
    return logits[:, None]


class _Markov(nn.Module):
  """A stub with the caption-cache protocol and hand-set probabilities."""
  table: tuple[tuple[tuple[float, ...], ...], ...]

  def setup(self):
    self.core = _MarkovCore(self.table)

  def encode_image(self, image, image_mask):
    b = image.shape[0]
    return jnp.zeros((b, 1, 1)), jnp.ones((b, 1), bool), jnp.zeros((b, 1, 1))

  def init_caption_cache(self, memory, memory_mask, memory_pos, max_len, beams=1):
    self.core(None)

  def caption_step(self, tokens):
    return self.core(tokens)


def _dist(eos, a):
  """Next-token probabilities by id; BOS and PAD share what is left."""
  probs = np.full(4, (1.0 - eos - a) / 2)
  probs[EOS], probs[A] = eos, a
  return tuple(float(np.log(p)) for p in probs)


def _markov(rows):
  """rows[position] = {last token: _dist}; other last tokens give a uniform next token."""
  uniform = _dist(0.25, 0.25)
  return _Markov(tuple(tuple(row.get(last, uniform) for last in range(4)) for row in rows))


def _run_markov(model, **kw):
  image, mask = jnp.zeros((1, 1, 1, 3)), jnp.ones((1, 1, 1), bool)
  tokens, scores = decoding.beam_search(model, {}, image, mask, bos_id=BOS, eos_id=EOS,
                                        max_len=3, pad_id=PAD, **kw)
  return list(np.asarray(tokens[0])), float(scores[0])


def test_length_penalty_changes_the_choice():
  """[EOS] alone has log P = log 0.37; [a, a, EOS] has log(0.5 * 0.7 * 0.85) = -1.21:
  alpha = 0 prefers the short caption, alpha = 1 the long one (-1.21 / (8/6) = -0.91)."""
  model = _markov([{BOS: _dist(0.37, 0.5)}, {A: _dist(0.1, 0.7)}, {A: _dist(0.85, 0.05)}])
  tokens, score = _run_markov(model, beam_size=2, length_penalty=0.0)
  assert tokens == [EOS, PAD, PAD]
  np.testing.assert_allclose(score, np.log(0.37), rtol=1e-6)
  tokens, score = _run_markov(model, beam_size=2, length_penalty=1.0)
  assert tokens == [A, A, EOS]
  np.testing.assert_allclose(score, np.log(0.5 * 0.7 * 0.85) / (8 / 6), rtol=1e-6)


def test_best_alive_when_nothing_finishes():
  """[EOS] never ranks among the 2 best candidates: the best unfinished caption comes
  back, scored with length max_len."""
  always = {last: _dist(0.01, 0.6) for last in range(4)}
  tokens, score = _run_markov(_markov([always] * 3), beam_size=2, length_penalty=0.5)
  assert tokens == [A, A, A]
  np.testing.assert_allclose(score, 3 * np.log(0.6) / _gnmt(3, 0.5), rtol=1e-6)


def test_invalid_arguments():
  model = _markov([{}])
  image, mask = jnp.zeros((1, 1, 1, 3)), jnp.ones((1, 1, 1), bool)
  with pytest.raises(ValueError, match='beam_size'):
    decoding.beam_search(model, {}, image, mask, bos_id=BOS, eos_id=EOS, max_len=1,
                         beam_size=0, length_penalty=0.0)
  with pytest.raises(ValueError, match='length_penalty'):
    decoding.beam_search(model, {}, image, mask, bos_id=BOS, eos_id=EOS, max_len=1,
                         beam_size=1, length_penalty=-1.0)
  with pytest.raises(ValueError, match='outside the model vocabulary'):
    decoding.greedy_decode(model, {}, image, mask, bos_id=BOS, eos_id=9, max_len=1)
