"""Benchmark: the backbone's convolutions one at a time, XLA:CPU's vs YNNPACK's vs PyTorch's.

Where the DETR and pre-training steps spend their backbone time, op by op: each of the
ResNet's distinct 3x3 and stem convolutions at a DETR shape, forward, input gradient and
kernel gradient, compiled with XLA's own convolution (`config.train.cpu_ynn_fusion_types`
'individual_dot') and with YNNPACK's ('individual_dot,individual_convolution'), against
`torch.nn.functional.conv2d` and its autograd gradients on the same data. Which library is
faster depends on the convolution's size and on the CPU (README, "Convolutions by XLA").
The 1x1 convs are matrix products in `base` (`pointwise_conv='dot'`), not here.

Each row checks that the three agree (relative error of the result) before timing them.

Usage: python bench/conv_ops.py [--quick] [--repeats N] [--shapes r50,tiny]
"""

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402  (first: provides ml_collections where missing)
from bench import detr_step  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from e2e_vlp.train import state as state_lib  # noqa: E402

LIBRARIES = {'XLA': 'individual_dot', 'YNNPACK': 'individual_dot,individual_convolution'}
OPS = ('forward', 'input grad', 'kernel grad')
ROUNDS = 3  # blocks of runs per library and op (`common.time_in_blocks`)


@dataclasses.dataclass(frozen=True)
class Conv:
  """One convolution of the backbone: NHWC input [batch, size, size, cin]."""
  where: str
  size: int
  cin: int
  cout: int
  kernel: int = 3
  stride: int = 1
  trained: bool = True  # False: frozen (stem, stage 1), only its forward runs in the step
  batch: int = 2

  @property
  def padding(self) -> int:
    return self.kernel // 2


def resnet_convs(shape: detr_step.DetrShape) -> list[Conv]:
  """The stem and each stage's distinct 3x3 convs (the strided first one, a stride-1 one)
  of `shape`'s backbone behind the 'imagenet' stem; stage 1 frozen, as in DETR. A basic
  block's strided conv widens the previous stage's channels; a bottleneck's runs after the
  1x1 reduction."""
  widths = [shape.width * 2 ** stage for stage in range(len(shape.stage_sizes))]
  batch = shape.batch
  convs = [Conv('stem 7x7/2', shape.image, 3, widths[0], 7, 2, trained=False, batch=batch)]
  size = shape.image // 4
  for stage, width in enumerate(widths):
    if stage:
      cin = widths[stage - 1] if shape.block == 'basic' else width
      convs.append(Conv(f'stage {stage + 1} 3x3/2', size, cin, width, stride=2, batch=batch))
      size //= 2
    convs.append(Conv(f'stage {stage + 1} 3x3', size, width, width, trained=stage > 0,
                      batch=batch))
  return convs


# The DETR benchmark's shapes (bench/detr_step.py), r50 first.
SHAPES = {name: resnet_convs(detr_step.SHAPES[name]) for name in ('r50', 'tiny')}


def jax_ops(conv: Conv) -> dict[str, Callable[..., Any]]:
  """op -> f(x, w, g) computing it; g is the output's cotangent."""
  pad = ((conv.padding, conv.padding),) * 2

  def apply(x, w):
    return jax.lax.conv_general_dilated(x, w, (conv.stride,) * 2, pad,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  return {'forward': lambda x, w, g: apply(x, w),
          'input grad': lambda x, w, g: jax.vjp(lambda x_: apply(x_, w), x)[1](g)[0],
          'kernel grad': lambda x, w, g: jax.vjp(lambda w_: apply(x, w_), w)[1](g)[0]}


def torch_ops(conv: Conv, x: np.ndarray, w: np.ndarray, g: np.ndarray
              ) -> dict[str, Callable[[], Any]]:
  """op -> thunk computing it in PyTorch (NCHW), on copies of the same data."""
  import torch  # noqa: PLC0415
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
  tg = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
  f = torch.nn.functional
  kwargs = {'stride': conv.stride, 'padding': conv.padding}

  def forward():
    with torch.no_grad():
      return f.conv2d(tx, tw, **kwargs)

  def grad(wrt):
    """The backward pass alone, through a graph kept from one forward pass."""
    leaf = (tx if wrt == 'x' else tw).detach().requires_grad_(True)
    out = f.conv2d(leaf, tw, **kwargs) if wrt == 'x' else f.conv2d(tx, leaf, **kwargs)
    return lambda: torch.autograd.grad(out, leaf, tg, retain_graph=True)[0]

  return {'forward': forward, 'input grad': grad('x'), 'kernel grad': grad('w')}


def _as_nhwc(op: str, value: Any) -> np.ndarray:
  """PyTorch's result in the JAX layout (NHWC activations, HWIO kernels)."""
  array = value.numpy()
  return array.transpose(2, 3, 1, 0) if op == 'kernel grad' else array.transpose(0, 2, 3, 1)


def time_conv(conv: Conv, repeats: int, warmup: int, rounds: int = 1) -> list[tuple]:
  """Table rows for `conv`: one per op its step runs, with medians and agreement."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((conv.batch, conv.size, conv.size, conv.cin), np.float32)
  w = (rng.standard_normal((conv.kernel, conv.kernel, conv.cin, conv.cout), np.float32)
       / np.sqrt(conv.kernel ** 2 * conv.cin)).astype(np.float32)
  ops = jax_ops(conv)
  out_shape = jax.eval_shape(ops['forward'], x, w, None).shape
  g = rng.standard_normal(out_shape, np.float32)
  args = tuple(jnp.asarray(a) for a in (x, w, g))
  peers = torch_ops(conv, x, w, g)
  rows = []
  for op in OPS if conv.trained else OPS[:1]:
    fns = {}
    for library, kinds in LIBRARIES.items():
      options = state_lib.compiler_options(
          common.AttrDict(cpu_backend_optimization_level=-1, cpu_ynn_fusion_types=kinds),
          'cpu')
      compiled = jax.jit(ops[op]).lower(*args).compile(options)
      fns[library] = lambda compiled=compiled: compiled(*args)
    fns['PyTorch'] = peers[op]
    reference = _as_nhwc(op, fns['PyTorch']())
    scale = np.abs(reference).max()
    error = max(float(np.abs(np.asarray(fns[lib]()) - reference).max() / scale)
                for lib in LIBRARIES)
    # Each library's calls in blocks, not interleaved call by call with the peers as the
    # step benchmarks are: XLA's convolution ran 4-6 ms slower right after a PyTorch call
    # than after its own (ResNet-50's 32 and 16 px convs; the cause not pinned down,
    # PyTorch's OpenMP workers spinning after their region is the likely one), as much as a
    # difference between two libraries here. One block per library let a load spike set a
    # row (a 16 px conv at 6.0 ms in every library, 3.2 alone), hence rounds of blocks.
    ms = common.time_in_blocks(fns, rounds=rounds, warmup=warmup, repeats=repeats)
    best = min(LIBRARIES, key=ms.get)
    rows.append((conv.where, f'{conv.size} px x {conv.cin}->{conv.cout}', op,
                 f'{ms["XLA"]:.1f}', f'{ms["YNNPACK"]:.1f}', f'{ms["PyTorch"]:.1f}',
                 f'{ms["YNNPACK"] / ms["XLA"]:.2f}x', f'{ms[best] / ms["PyTorch"]:.2f}x',
                 f'{error:.0e}'))
  return rows


HEADERS = ('conv', 'input', 'op', 'XLA ms', 'YNNPACK ms', 'PyTorch ms', 'YNNPACK / XLA',
           'faster of ours / PyTorch', 'max rel. diff')


def run(quick: bool = False, repeats: int | None = None,
        shapes: tuple[str, ...] = ('r50', 'tiny')) -> str:
  """Markdown section: every conv op's medians and ratios, per shape."""
  import torch  # noqa: PLC0415
  load = common.host_load()
  torch.set_num_threads(os.cpu_count() or 1)
  repeats = repeats or (5 if quick else 10)
  rows = [row for name in shapes for conv in SHAPES[name]
          for row in time_conv(conv, repeats, warmup=2, rounds=ROUNDS)]
  shape_lines = [f'- {name}: batch {SHAPES[name][0].batch}, {SHAPES[name][0].size} px '
                 f'images' for name in shapes]
  return '\n'.join([
      '## Backbone convolutions, op by op: XLA vs YNNPACK vs PyTorch (bench/conv_ops.py)', '',
      common.load_note(load), '', common.markdown_table(HEADERS, rows), '', *shape_lines,
      f'- Each library: the median over {ROUNDS} rounds of the median of {repeats} runs in a '
      'row, after 2 warm-up runs; in each round every library in turn, the first one '
      'rotating (`time_conv`, `common.time_in_blocks`); PyTorch '
      f'{torch.get_num_threads()} threads, its gradients without the forward pass, '
      'OMP_WAIT_POLICY='
      f'{os.environ.get("OMP_WAIT_POLICY", "unset")} (bench/detr_step.py sets it on a busy '
      'host). Frozen convs (stem, stage 1): forward only.', ''])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='fewer repeats')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--shapes', default='r50,tiny', help='comma-separated: r50,tiny')
  args = parser.parse_args()
  print(run(args.quick, args.repeats, tuple(args.shapes.split(','))))


if __name__ == '__main__':
  main()
