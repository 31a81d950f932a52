"""The train step's XLA:CPU options: which operations YNNPACK runs, and that the choice
changes kernels, not results."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from e2e_vlp.train import state as state_lib


def _conv_dot_and_sum(x, w, a):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y, a @ a, jnp.sum(x * x, axis=(1, 2))


def _ynn_fusions(hlo: str) -> str:
  """The bodies of the computations that YNNPACK fusions call, as one string."""
  called = set(re.findall(r'calls=%([\w.]+), .*"kind":"__ynn_fusion"', hlo))
  blocks = re.findall(r'^(%([\w.]+) .*?^})', hlo, re.S | re.M)
  return '\n'.join(block for block, name in blocks if name in called)


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(2, 16, 16, 32)).astype(np.float32),
          rng.normal(size=(3, 3, 32, 32)).astype(np.float32),
          rng.normal(size=(512, 512)).astype(np.float32))


@pytest.mark.parametrize('kinds, conv_in_ynn, dot_in_ynn, sum_in_ynn', [
    ('default', True, True, True),  # XLA's choice in jax 0.10: all three
    ('individual_dot', False, True, False),
    ('individual_dot,reduce', False, True, True),  # both configs' setting
    ('individual_dot,individual_convolution,reduce', True, True, True),
    ('', False, False, False),
])
def test_ynn_fusion_types_choose_the_kernels_and_keep_the_numbers(inputs, kinds, conv_in_ynn,
                                                                  dot_in_ynn, sum_in_ynn):
  train = pretrain.get_config('tiny').train
  train.cpu_ynn_fusion_types = kinds
  lowered = jax.jit(_conv_dot_and_sum).lower(*inputs)
  compiled = lowered.compile(state_lib.compiler_options(train, 'cpu'))
  fused = _ynn_fusions(compiled.as_text())
  assert ('convolution(' in fused) == conv_in_ynn
  assert ('dot(' in fused) == dot_in_ynn
  assert (' reduce(' in fused) == sum_in_ynn
  reference = jax.jit(_conv_dot_and_sum)(*inputs)
  for ours, ref in zip(compiled(*inputs), reference):
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_options_apply_on_cpu_only():
  train = pretrain.get_config('base').train
  assert state_lib.compiler_options(train, 'gpu') is None
  assert state_lib.compiler_options(train, 'cpu') == {
      'xla_backend_optimization_level': 1,
      'xla_cpu_experimental_ynn_fusion_type':
          'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
  train.update(cpu_backend_optimization_level=-1, cpu_ynn_fusion_types='default')
  assert state_lib.compiler_options(train, 'cpu') is None
