"""`models.stochastic`: jax's threefry bits, bernoulli masks and flax's dropout, bit for bit,
drawn without jax's rolled CPU loop."""

import flax.linen as nn
import jax
import jax.extend.random as jax_random
import jax.numpy as jnp
import numpy as np
import pytest

from e2e_vlp.models import stochastic
from e2e_vlp.models import transformer


def _words(*values):
  return tuple(jnp.asarray(np.uint32(v)) for v in values)


@pytest.mark.parametrize('key, count, expected', [
    # Random123's known-answer vectors for Threefry2x32_20 (kat_vectors).
    ((0, 0), (0, 0), (0x6b200159, 0x99ba4efe)),
    ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
    ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0)),
])
def test_threefry_known_answers(key, count, expected):
  out = stochastic.threefry_2x32(_words(*key), _words(*count))
  assert tuple(int(w) for w in out) == expected


def test_threefry_matches_jax_on_many_counters():
  counts = np.random.default_rng(0).integers(0, 2 ** 32, (2, 1000), dtype=np.uint32)
  key = np.array([0x12345678, 0x9abcdef0], np.uint32)
  # jax.extend.random.threefry_2x32 hashes the first half of its flat count against the second.
  expected = np.asarray(jax_random.threefry_2x32(key, counts.reshape(-1))).reshape(2, -1)
  out = stochastic.threefry_2x32(_words(*key), tuple(jnp.asarray(c) for c in counts))
  np.testing.assert_array_equal(np.stack([np.asarray(o) for o in out]), expected)


@pytest.mark.parametrize('shape', [(), (7,), (3, 5, 11), (2, 4, 64, 64)])
@pytest.mark.parametrize('p', [0.9, 0.5, 0.1])
@pytest.mark.parametrize('typed_key', [False, True])
def test_bernoulli_is_jax_bernoulli(shape, p, typed_key):
  key = jax.random.key(3) if typed_key else jax.random.PRNGKey(3)
  ours = jax.jit(lambda k: stochastic.bernoulli(k, p, shape))(key)
  theirs = jax.jit(lambda k: jax.random.bernoulli(k, p, shape))(key)
  assert ours.dtype == jnp.bool_ and ours.shape == shape
  np.testing.assert_array_equal(ours, theirs)


def test_bernoulli_draws_other_implementations_through_jax_random():
  key = jax.random.key(5, impl='rbg')
  np.testing.assert_array_equal(stochastic.bernoulli(key, 0.7, (4, 9)),
                                jax.random.bernoulli(key, 0.7, (4, 9)))


def _array_loops(fn, x):
  """How many while loops of the compiled `fn(x)` carry arrays shaped as x."""
  shape = 'u32[' + ','.join(map(str, x.shape)) + ']'
  hlo = jax.jit(fn).lower(x).compile().as_text()
  return sum(shape in line for line in hlo.splitlines() if ' while(' in line)


def test_dropout_is_flax_dropout_without_a_loop():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 32))
  rngs = {'dropout': jax.random.PRNGKey(1)}

  def apply(module):
    def fn(x):
      return module.apply({}, x, deterministic=False, rngs=rngs)
    return fn

  ours, theirs = apply(stochastic.Dropout(0.1)), apply(nn.Dropout(0.1))
  np.testing.assert_array_equal(jax.jit(ours)(x), jax.jit(theirs)(x))
  cotangent = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)
  grad = lambda f: jax.jit(lambda x: jax.vjp(f, x)[1](cotangent)[0])(x)
  np.testing.assert_array_equal(grad(ours), grad(theirs))
  assert np.isclose(float(jnp.mean(jax.jit(ours)(x) == 0)), 0.1, atol=0.02)
  # The point of it: jax's CPU lowering draws the mask through a while loop, ours does not
  # (flax's key derivation loops over scalars in both).
  assert _array_loops(theirs, x) == 1
  assert _array_loops(ours, x) == 0
  for rate, expected in ((0.0, x), (1.0, jnp.zeros_like(x))):
    np.testing.assert_array_equal(apply(stochastic.Dropout(rate))(x), expected)
  np.testing.assert_array_equal(
      stochastic.Dropout(0.5).apply({}, x, deterministic=True), x)


class _FlaxAttention(nn.Module):
  """flax's attention with its own bernoulli dropout, as Attention called it before."""

  @nn.compact
  def __call__(self, query, key, value, mask):
    return nn.dot_product_attention(
        query, key, value, mask=mask, dropout_rng=self.make_rng('dropout'),
        dropout_rate=0.2, broadcast_dropout=False, deterministic=False,
        force_fp32_for_softmax=True)


def test_attention_dropout_is_flax_attention_dropout():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
  mask = jnp.arange(6)[None, None, None, :] < jnp.array([6, 4])[:, None, None, None]
  attention = transformer.Attention(num_heads=4, dropout_rate=0.2)
  variables = nn.unbox(attention.init(jax.random.PRNGKey(1), x, x, x, mask,
                                      deterministic=True))
  rngs = {'dropout': jax.random.PRNGKey(2)}  # both modules are top-level: the same key
  ours = attention.apply(variables, x, x, x, mask, deterministic=False, rngs=rngs)

  def project(name):
    params = variables['params'][name]
    return jnp.einsum('btd,dhk->bthk', x, params['kernel']) + params.get('bias', 0.0)

  theirs = _FlaxAttention().apply(
      {}, project('query'), project('key'), project('value'), mask, rngs=rngs)
  assert ours.shape == theirs.shape == (2, 6, 4, 8)
  plain = attention.apply(variables, x, x, x, mask, deterministic=True)
  assert float(jnp.max(jnp.abs(theirs - plain))) > 1e-2  # the dropout did drop
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_masks_are_the_same_when_the_step_is_sharded():
  """`jax.jit` with sharded outputs (8 host devices): each device draws its own slice of
  the same masks (the counter is built from iotas, which XLA partitions)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  key = jax.random.PRNGKey(11)
  x = jax.device_put(jax.random.normal(key, (16, 24, 8)), sharding)
  rngs = {'dropout': jax.random.PRNGKey(12)}
  apply = lambda module: jax.jit(
      lambda x: module.apply({}, x, deterministic=False, rngs=rngs), out_shardings=sharding)
  ours = apply(stochastic.Dropout(0.3))(x)
  assert ours.sharding == sharding
  np.testing.assert_array_equal(ours, apply(nn.Dropout(0.3))(x))
  mask = jax.jit(lambda k: stochastic.bernoulli(k, 0.8, x.shape), out_shardings=sharding)(key)
  np.testing.assert_array_equal(mask, jax.random.bernoulli(key, 0.8, x.shape))
