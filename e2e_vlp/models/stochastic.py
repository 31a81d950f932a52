"""Dropout with jax's own keep masks, drawn without jax's loop on XLA:CPU.

`jax.random.bernoulli` draws a threefry key's bits with the Threefry-2x32 hash, which jax
lowers on the CPU backend as a rolled loop (a `while` of 5 iterations over full-size
arrays, chosen there for compile time; jax/_src/random/threefry2x32.py). XLA:CPU runs each
iteration as its own passes over memory: 0.3-1 ms per dropout layer in the DETR steps,
~4% of the `tiny` one. The same 20 rounds written out in jnp are elementwise operations
that XLA fuses into one loop per dropout layer. The bits, hence the masks and every
output, are jax's exactly (tests/test_stochastic.py): this changes speed only, and compile
time (each layer's hash is its own kernel: ~0.05 s more per layer at LLVM -O1).

Where the result could differ from `jax.random`, it is used instead: other backends (their
lowering is already unrolled), keys of another implementation, `jax_threefry_partitionable`
off, `jax_enable_x64` on (a float64 `p`) and arrays of 2**32 elements or more.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from e2e_vlp.materialize import materialized

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)  # Threefry's key-schedule constant


def threefry_2x32(key: tuple[jax.Array, jax.Array], count: tuple[jax.Array, jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 block cipher (20 rounds, Salmon et al. 2011), as jax computes it.

  Args:
    key: two uint32 words (scalars or broadcastable arrays).
    count: two uint32 arrays of one shape, the counter's words.

  Returns:
    The two uint32 output words, shaped as `count`.
  """
  k0, k1 = key
  schedule = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
  x0, x1 = count[0] + schedule[0], count[1] + schedule[1]
  for block in range(5):
    for rotation in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = jax.lax.shift_left(x1, np.uint32(rotation)) | jax.lax.shift_right_logical(
          x1, np.uint32(32 - rotation))
      x1 = x0 ^ x1
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _threefry_words(key: jax.Array) -> tuple[jax.Array, jax.Array] | None:
  """A threefry key's two uint32 words, or None where `jax.random` must draw."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != 'threefry2x32':
      return None
    key = jax.random.key_data(key)
  elif jax.config.jax_default_prng_impl != 'threefry2x32':
    return None
  if key.shape != (2,) or key.dtype != jnp.uint32:
    return None
  return key[0], key[1]


def _flat_index(shape: Sequence[int]) -> jax.Array:
  """uint32 `[*shape]` row-major element index, built from per-axis iotas (as jax does,
  so that XLA's SPMD partitioner splits it with the array)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  return index


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)` for a float32 `p`, bit for bit."""
  shape = tuple(shape)
  words = _threefry_words(key)
  if (words is None or jax.default_backend() != 'cpu' or jax.config.jax_enable_x64
      or not jax.config.jax_threefry_partitionable or math.prod(shape) >= 2 ** 32):
    return jax.random.bernoulli(key, p, shape)
  # jax's counter is the 64-bit element index as (high, low) words: high is 0 here.
  hi, lo = threefry_2x32(words, (jnp.zeros(shape, jnp.uint32), _flat_index(shape)))
  bits = hi ^ lo
  # jax.random.uniform: 23 random mantissa bits under the exponent of 1.0, minus 1.
  one = np.array(1.0, np.float32).view(np.uint32)
  uniform = jax.lax.bitcast_convert_type(
      jax.lax.shift_right_logical(bits, np.uint32(9)) | one, jnp.float32) - np.float32(1.0)
  # XLA would fuse the ~100-operation hash into every consumer of the mask (the dropout,
  # its gradient, reductions after them: 49 copies for the 13 dropout layers of the tiny
  # DETR step); stored once, the copies are comparisons.
  return materialized(uniform) < np.float32(p)


class Dropout(nn.Module):
  """`flax.linen.Dropout` (same rng stream, masks and outputs) with the fused `bernoulli`.

  Attributes:
    rate: the probability of dropping an element.
  """
  rate: float

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    keep = bernoulli(self.make_rng('dropout'), keep_prob, inputs.shape)
    return jax.lax.select(keep, inputs / keep_prob, jnp.zeros_like(inputs))
