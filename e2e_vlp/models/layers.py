"""Small building blocks whose parameters all carry logical axis names.

Every parameter is created through `partitioned(init, names)`, so the sharding rules in
`e2e_vlp/train/sharding.py` can place it; activations are annotated with `constrain`.
Square `[d, d]` kernels are named ('embed', 'mlp') so that no rule table maps both
dimensions onto the same mesh axis.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

Initializer = Callable[..., Any]
Names = Sequence[str | None]

BERT_INIT = nn.initializers.normal(stddev=0.02)  # HF BERT _init_weights
PARAM_DTYPE = jnp.float32
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Activation names (see e2e_vlp/train/sharding.py).
ACT_BLD = ('act_batch', 'act_length', 'act_embed')
ACT_BLM = ('act_batch', 'act_length', 'act_mlp')
ACT_BLHK = ('act_batch', 'act_length', 'act_heads', 'act_kv')
ACT_BLV = ('act_batch', 'act_length', 'act_vocab')


def compute_dtype(name: str) -> jnp.dtype:
  """Maps `config.model.dtype` to a jnp dtype; parameters always stay float32."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(
        f'config.model.dtype={name!r} is not supported; use one of {sorted(COMPUTE_DTYPES)}.')
  return COMPUTE_DTYPES[name]


def partitioned(init: Initializer, names: Names) -> Initializer:
  """`init` whose result is boxed with logical axis `names` (one per dimension)."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x, names: Names):
  """Sharding hint on an activation; a no-op outside `nn.logical_axis_rules`."""
  return nn.with_logical_constraint(x, tuple(names))


def dense(features: int, names: tuple[str | None, str | None], *, dtype: jnp.dtype,
          name: str | None = None, kernel_init: Initializer = BERT_INIT,
          bias_init: Initializer = nn.initializers.zeros) -> nn.Dense:
  """`nn.Dense` with a kernel [in, out] named `names` and a bias named `names[1:]`."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=PARAM_DTYPE,
      kernel_init=partitioned(kernel_init, names),
      bias_init=partitioned(bias_init, names[1:]), name=name)


def layer_norm(epsilon: float, *, dtype: jnp.dtype, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm (statistics in float32, two-pass variance) with scale/bias named ('norm',).

  Two-pass (`use_fast_variance=False`): E[x^2] - E[x]^2 loses precision when the mean is
  large against the spread, and PyTorch (the Hugging Face mirror) uses two passes.
  """
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=PARAM_DTYPE, use_fast_variance=False,
      scale_init=partitioned(nn.initializers.ones, ('norm',)),
      bias_init=partitioned(nn.initializers.zeros, ('norm',)), name=name)


def mlp_axis_names(num_layers: int, out_name: str | None) -> list[tuple[str, str | None]]:
  """Kernel names of a `num_layers` MLP on d-dim inputs: alternate ('embed', 'mlp')."""
  names = []
  for i in range(num_layers):
    in_name = 'embed' if i % 2 == 0 else 'mlp'
    hidden_out = 'mlp' if i % 2 == 0 else 'embed'
    names.append((in_name, out_name if i == num_layers - 1 else hidden_out))
  return names


class MLP(nn.Module):
  """DETR's MLP: `num_layers` dense layers `layers_{i}`, ReLU between them.

  Attributes:
    hidden: width of the hidden layers.
    features: output width.
    num_layers: number of dense layers (>= 1).
    out_name: logical name of the output dimension.
    last_kernel_init / last_bias_init: initialisers of the last layer (e.g. zero-init).
  """
  hidden: int
  features: int
  num_layers: int
  dtype: jnp.dtype = jnp.float32
  out_name: str | None = None
  last_kernel_init: Initializer = BERT_INIT
  last_bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[..., d] -> [..., features]."""
    if self.num_layers < 1:
      raise ValueError(f'An MLP needs at least one layer, got num_layers={self.num_layers}.')
    names = mlp_axis_names(self.num_layers, self.out_name)
    for i, layer_names in enumerate(names):
      last = i == self.num_layers - 1
      x = dense(
          self.features if last else self.hidden, layer_names, dtype=self.dtype,
          name=f'layers_{i}',
          kernel_init=self.last_kernel_init if last else BERT_INIT,
          bias_init=self.last_bias_init if last else nn.initializers.zeros)(x)
      if not last:
        x = nn.relu(x)
    return x


class DenseGeneral(nn.Module):
  """Dense over the last `len(in_names)` axes into `features` (e.g. [embed] -> [heads, kv]).

  Unlike `nn.DenseGeneral`, which initialises its kernel flat and reshapes it, the kernel
  is created in its final shape, so its logical names (one per dimension) stay valid.
  """
  features: tuple[int, ...]
  in_names: tuple[str | None, ...]
  out_names: tuple[str | None, ...]
  dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = BERT_INIT

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    num_in = len(self.in_names)
    kernel = self.param('kernel', partitioned(self.kernel_init, self.in_names + self.out_names),
                        tuple(x.shape[-num_in:]) + tuple(self.features), PARAM_DTYPE)
    bias = self.param('bias', partitioned(nn.initializers.zeros, self.out_names),
                      tuple(self.features), PARAM_DTYPE)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=num_in)
    return y + bias.astype(self.dtype)
