"""An identity XLA computes once: the work-around for XLA:CPU recomputing cheap values.

XLA duplicates a cheap elementwise producer into each of its consumers instead of storing
its result. On XLA:CPU, which has no multi-output loop fusion, that costs in three places:
- a convolution's kernel gradient reads its input transposed, and XLA fuses the BatchNorm
  and ReLU that made that input into the transpose, whose per-channel broadcasts make it
  several times slower than a plain transpose (`resnet`'s `relu='materialized'`);
- an optimizer update writes parameters and moments from one fused step; each output's
  fusion recomputes the new moments from the old ones, so the old ones must survive the
  in-place writes and XLA copies them first (`optim.fused_update`);
- a dropout mask's ~100-operation hash would be copied into every consumer of the mask
  (`models.stochastic.bernoulli`, whose fused hash is itself the CPU backend's form).
A divide is not cheap, so `y / (1 + 0 y)` makes XLA keep y and read the stored buffer.
All three uses apply it on the CPU backend only: GPU and TPU fuse otherwise, and it was not
measured there. Measurements: README "Benchmarks".
"""

import jax
import jax.numpy as jnp


@jax.custom_jvp
def materialized(y: jnp.ndarray) -> jnp.ndarray:
  """The identity (exact for finite y; +-inf becomes NaN), stored once by XLA; its
  derivative is the identity's, in forward and reverse mode (XLA may sum a kernel gradient
  in another order: 1e-9 apart after 3 `tiny` steps)."""
  return y / (1 + 0 * y)


@materialized.defjvp
def _materialized_jvp(primals, tangents):
  (y,), (tangent,) = primals, tangents
  return materialized(y), tangent


def materialized_on_cpu(y: jnp.ndarray) -> jnp.ndarray:
  """`materialized(y)` on the CPU backend, y itself elsewhere (decided when traced)."""
  return materialized(y) if jax.default_backend() == 'cpu' else y
