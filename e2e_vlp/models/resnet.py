"""ResNet backbone with torchvision parameter names, so PyTorch weights convert directly.

Layout: `conv1`, `bn1`, then blocks `layer{i}_{j}` holding `conv1, bn1, conv2, bn2,
(conv3, bn3), downsample_conv, downsample_bn`. Conv kernels are HWIO (torch OIHW
transposed by (2, 3, 1, 0)). Padding is explicit and symmetric like torch (flax 'SAME'
pads stride-2 convs asymmetrically), so a feature map has ceil(H / stride) rows.

Normalisation (`norm`):
- 'frozen_bn' (DETR, the default): scale, bias, mean and var all live in the 'batch_stats'
  collection, so the optimizer never sees them. Right for pretrained weights; from scratch
  it is the identity, and activations grow with depth.
- 'group_norm': trainable GroupNorm (32 groups or fewer), stateless, any batch size; the
  last norm of each residual branch starts at zero (Goyal et al. 2017), so every block
  starts as the identity. For backbones trained from scratch (the `tiny` config).
- 'batch_norm': trainable BatchNorm, scale/bias in 'params', statistics in 'batch_stats'
  (apply with `mutable=['batch_stats']` when `train=True`); for evaluation and weight
  conversion only: the train step keeps 'batch_stats' constant.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2e_vlp.materialize import materialized_on_cpu
from e2e_vlp.models import layers

BLOCKS = ('basic', 'bottleneck')
STEMS = ('imagenet', 'small')
_DEPTHS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
# flax rejects a logical name used twice in one array, hence one 'conv_kernel'.
_CONV_NAMES = ('conv_kernel', None, 'conv_in', 'conv_out')
# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
BN_EPS = 1e-5  # torchvision / DETR FrozenBatchNorm2d
NORMS = ('frozen_bn', 'batch_norm', 'group_norm')
STEM_CONVS = ('conv', 'row_fold')
MAX_POOLS = ('reduce_window', 'unrolled')
POINTWISE_CONVS = ('conv', 'dot')
RELUS = ('plain', 'materialized')


def resnet_stages(depth: int) -> tuple[str, tuple[int, ...]]:
  """The (block, stage_sizes) of torchvision's ResNet-`depth`."""
  if depth not in _DEPTHS:
    raise ValueError(f'No ResNet-{depth}; use a depth in {sorted(_DEPTHS)} or set '
                     'config.model.backbone.block/stage_sizes directly.')
  return _DEPTHS[depth]


def output_stride(stem: str, num_stages: int, dilation: bool) -> int:
  """Pixels per feature cell: stem stride x 2 per later stage, halved by `dilation`."""
  if stem not in STEMS:
    raise ValueError(f'config.model.backbone.stem={stem!r}; use one of {STEMS}.')
  stride = (4 if stem == 'imagenet' else 2) * 2 ** (num_stages - 1)
  return stride // 2 if dilation and num_stages > 1 else stride


def _conv(features: int, kernel: int, stride: int, dtype: jnp.dtype, name: str,
          dilation: int = 1, pointwise: str = 'conv') -> nn.Module:
  if kernel == 1 and pointwise == 'dot':
    return PointwiseConv(features, stride, dtype, name=name)
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      kernel_dilation=(dilation, dilation), use_bias=False, dtype=dtype,
      param_dtype=layers.PARAM_DTYPE, kernel_init=layers.partitioned(_CONV_INIT, _CONV_NAMES),
      name=name)


class PointwiseConv(nn.Module):
  """A strided 1x1 conv as a matrix product over the channels of the strided input.

  XLA:CPU runs the product and its two gradient products 1.1-2.8x faster than its
  convolution with the same 1x1 kernel (ResNet-50's 1x1 shapes at 512 px, batch 2); with
  `_channel_product`'s gradient, the DETR step at r50 went from 1.49x to 1.01x Hugging
  Face's time (README "Benchmarks"). Same parameter (`kernel` [1, 1, C, features], HWIO)
  and outputs as `_conv(features, 1, stride)`.
  """
  features: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), features]."""
    kernel = self.param('kernel', layers.partitioned(_CONV_INIT, _CONV_NAMES),
                        (1, 1, x.shape[-1], self.features), layers.PARAM_DTYPE)
    x = x[:, ::self.stride, ::self.stride].astype(self.dtype)
    return _channel_product(x, kernel[0, 0].astype(self.dtype))


@jax.custom_vjp
def _channel_product(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """[B, H, W, C] x [C, D] -> [B, H, W, D].

  The kernel's gradient sums x^T g over B, H, W, which XLA:CPU computes by first
  transposing one operand in memory. Written as dot(x, g), it transposes x, a stored
  activation, and YNNPACK runs the product. Autodiff's form transposes g inside the fusion
  that computes g (BatchNorm's backward, the ReLU mask), several times slower than a plain
  transpose, and dot(g, x).T (this gradient's form before, where x has more channels) also
  ran on Eigen instead of YNNPACK: README "Benchmarks", the 1x1 bullet.
  """
  return jax.lax.dot_general(x, w, (((3,), (0,)), ((), ())))


def _channel_product_fwd(x, w):
  return _channel_product(x, w), (x, w)


def _channel_product_bwd(residuals, g):
  x, w = residuals
  dx = jax.lax.dot_general(g, w, (((3,), (1,)), ((), ())))
  dw = jax.lax.dot_general(x, g, (((0, 1, 2), (0, 1, 2)), ((), ())))
  return dx, dw


_channel_product.defvjp(_channel_product_fwd, _channel_product_bwd)


def _relu(form: str):
  """The ReLU of `form`; 'materialized' only on the CPU backend, whose fusion it works
  around (GPU and TPU fuse otherwise, and it was not measured there)."""
  if form not in RELUS:
    raise ValueError(f'config.model.backbone.relu={form!r}; use one of {RELUS}.')
  if form == 'plain':
    return nn.relu
  return lambda x: materialized_on_cpu(nn.relu(x))


class RowFoldedConv(nn.Module):
  """A strided k x k conv on few input channels, computed as a 1 x k conv on k C channels.

  The k kernel rows become channels: row slices i, i + s, ... of the padded input are
  stacked, so XLA's CPU convolution sees k C input channels instead of C (3 for an image),
  which it runs about twice as fast (the 7x7/2 stem of `tiny`: 21 ms against 44 ms in a
  profile; bench/detr_step.py's 'CPU stem' row). Same sums, same parameter (`kernel`
  [k, k, C, features], HWIO) and same symmetric padding as `_conv`.
  """
  features: int
  kernel_size: int
  stride: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), features] (k odd)."""
    k, s = self.kernel_size, self.stride
    batch, height, width, channels = x.shape
    kernel = self.param('kernel', layers.partitioned(_CONV_INIT, _CONV_NAMES),
                        (k, k, channels, self.features), layers.PARAM_DTYPE)
    pad = (k - 1) // 2
    out_height = (height + 2 * pad - k) // s + 1
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (pad, pad), (0, 0), (0, 0)))
    rows = jnp.concatenate(  # [B, out_height, W, k C], channel index i * C + c
        [jax.lax.slice(x, (0, i, 0, 0), (batch, i + s * (out_height - 1) + 1, width, channels),
                       (1, s, 1, 1)) for i in range(k)], axis=-1)
    folded = kernel.astype(self.dtype).transpose(1, 0, 2, 3).reshape(1, k, k * channels, -1)
    return jax.lax.conv_general_dilated(rows, folded, (1, s), ((0, 0), (pad, pad)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def unrolled_max_pool(x: jnp.ndarray, window: int, stride: int, pad: int) -> jnp.ndarray:
  """`nn.max_pool` with symmetric -inf padding, as a maximum over window^2 strided slices.

  Its gradient is one fused select, where XLA lowers max_pool's select-and-scatter on CPU
  to a variadic reduce-window over index iotas (in a profile of the `tiny` step: 20 ms
  against ~50 ms). At exact ties the gradient is shared, where max_pool gives it all to one
  input (both are subgradients; after a ReLU, ties are zeros whose gradient the ReLU drops).
  [B, H, W, C] -> [B, (H + 2 pad - window) // stride + 1, ..., C].
  """
  batch, height, width, channels = x.shape
  out_h = (height + 2 * pad - window) // stride + 1
  out_w = (width + 2 * pad - window) // stride + 1
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(window):
    for j in range(window):
      view = jax.lax.slice(x, (0, i, j, 0), (batch, i + stride * (out_h - 1) + 1,
                                             j + stride * (out_w - 1) + 1, channels),
                           (1, stride, stride, 1))
      out = view if out is None else jnp.maximum(out, view)
  return out


class FrozenBatchNorm(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias; all four in 'batch_stats'.

  Initialised as the identity (scale 1, bias 0, mean 0, var 1).
  """
  epsilon: float = BN_EPS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[..., C] -> [..., C]."""
    c = x.shape[-1]

    def stat(name, fill):
      init = layers.partitioned(lambda: fill((c,), jnp.float32), ('norm',))
      return self.variable('batch_stats', name, init).value

    scale, bias = stat('scale', jnp.ones), stat('bias', jnp.zeros)
    mean, var = stat('mean', jnp.zeros), stat('var', jnp.ones)
    mult = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x.astype(jnp.float32) * mult + (bias - mean * mult)).astype(self.dtype)


def _norm(norm: str, train: bool, dtype: jnp.dtype, name: str, *,
          channels: int, last_in_branch: bool = False) -> nn.Module:
  if norm == 'frozen_bn':
    return FrozenBatchNorm(dtype=dtype, name=name)
  if norm == 'group_norm':
    scale_init = nn.initializers.zeros if last_in_branch else nn.initializers.ones
    return nn.GroupNorm(
        num_groups=math.gcd(32, channels), epsilon=BN_EPS, dtype=dtype,
        param_dtype=layers.PARAM_DTYPE, use_fast_variance=False,  # two-pass, as PyTorch
        scale_init=layers.partitioned(scale_init, ('norm',)),
        bias_init=layers.partitioned(nn.initializers.zeros, ('norm',)), name=name)
  if norm != 'batch_norm':
    raise ValueError(f'config.model.backbone.norm={norm!r}; use one of {NORMS}.')
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=BN_EPS, dtype=dtype,
      param_dtype=layers.PARAM_DTYPE,
      scale_init=layers.partitioned(nn.initializers.ones, ('norm',)),
      bias_init=layers.partitioned(nn.initializers.zeros, ('norm',)), name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); stride on the first."""
  features: int
  stride: int = 1
  dilation: int = 1
  norm: str = 'frozen_bn'
  pointwise_conv: str = 'conv'
  relu: str = 'plain'
  dtype: jnp.dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """[B, H, W, C] -> [B, H/stride, W/stride, features]."""
    norm = lambda name, last=False: _norm(self.norm, train, self.dtype, name,
                                          channels=self.features, last_in_branch=last)
    relu = _relu(self.relu)
    y = _conv(self.features, 3, self.stride, self.dtype, 'conv1', self.dilation)(x)
    y = relu(norm('bn1')(y))
    y = _conv(self.features, 3, 1, self.dtype, 'conv2', self.dilation)(y)
    y = norm('bn2', last=True)(y)
    return relu(y + _shortcut(self, x, train))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4 channels); stride on the 3x3 conv (torchvision v1.5)."""
  features: int
  stride: int = 1
  dilation: int = 1
  norm: str = 'frozen_bn'
  pointwise_conv: str = 'conv'
  relu: str = 'plain'
  dtype: jnp.dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """[B, H, W, C] -> [B, H/stride, W/stride, 4 * features]."""
    norm = lambda name, channels, last=False: _norm(self.norm, train, self.dtype, name,
                                                    channels=channels, last_in_branch=last)
    pointwise = lambda features, name: _conv(features, 1, 1, self.dtype, name,
                                             pointwise=self.pointwise_conv)
    relu = _relu(self.relu)
    y = relu(norm('bn1', self.features)(pointwise(self.features, 'conv1')(x)))
    y = _conv(self.features, 3, self.stride, self.dtype, 'conv2', self.dilation)(y)
    y = relu(norm('bn2', self.features)(y))
    out = self.features * self.expansion
    y = norm('bn3', out, last=True)(pointwise(out, 'conv3')(y))
    return relu(y + _shortcut(self, x, train))


def _shortcut(block: BasicBlock | Bottleneck, x: jnp.ndarray, train: bool) -> jnp.ndarray:
  """Identity, or a strided 1x1 conv + BN where the shape changes (torchvision)."""
  out = block.features * block.expansion
  if block.stride == 1 and x.shape[-1] == out:
    return x
  y = _conv(out, 1, block.stride, block.dtype, 'downsample_conv',
            pointwise=block.pointwise_conv)(x)
  return _norm(block.norm, train, block.dtype, 'downsample_bn', channels=out)(y)


class ResNet(nn.Module):
  """ResNet feature extractor (no pooling / fc head).

  Attributes:
    block: 'basic' or 'bottleneck'.
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    width: channels of stage 1 (before expansion); doubled at each later stage.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'small' (one 3x3/2 conv).
    dilation: dilate the last stage instead of striding it (DETR-DC5).
    norm: 'frozen_bn', 'group_norm' or 'batch_norm' (see the module docstring).
    stem_conv: how the stem conv is computed: 'conv' (one XLA convolution) or 'row_fold'
      (`RowFoldedConv`). The same function and parameters; only the speed differs.
    max_pool: how the 'imagenet' stem pools: 'reduce_window' (`nn.max_pool`) or 'unrolled'
      (`unrolled_max_pool`). The same function up to the gradient at exact ties.
    pointwise_conv: how the blocks' 1x1 convs are computed: 'conv' (XLA's convolution) or
      'dot' (`PointwiseConv`). The same function and parameters; only the speed differs.
    relu: 'plain' (`nn.relu`) or 'materialized' (followed by `materialized` on the CPU
      backend, so XLA:CPU transposes stored activations for the kernel gradients; `nn.relu`
      elsewhere). Only the speed differs.
  """
  block: str = 'bottleneck'
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  stem: str = 'imagenet'
  dilation: bool = False
  norm: str = 'frozen_bn'
  stem_conv: str = 'conv'
  max_pool: str = 'reduce_window'
  pointwise_conv: str = 'conv'
  relu: str = 'plain'
  dtype: jnp.dtype = jnp.float32

  @property
  def output_stride(self) -> int:
    return output_stride(self.stem, len(self.stage_sizes), self.dilation)

  @property
  def out_channels(self) -> int:
    expansion = 4 if self.block == 'bottleneck' else 1
    return self.width * 2 ** (len(self.stage_sizes) - 1) * expansion

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """[B, H, W, 3] -> [B, ceil(H / S), ceil(W / S), out_channels], S = output_stride."""
    if self.block not in BLOCKS:
      raise ValueError(f'config.model.backbone.block={self.block!r}; use one of {BLOCKS}.')
    if self.stem not in STEMS:
      raise ValueError(f'config.model.backbone.stem={self.stem!r}; use one of {STEMS}.')
    if self.stem_conv not in STEM_CONVS:
      raise ValueError(f'config.model.backbone.stem_conv={self.stem_conv!r}; use one of '
                       f'{STEM_CONVS}.')
    if self.max_pool not in MAX_POOLS:
      raise ValueError(f'config.model.backbone.max_pool={self.max_pool!r}; use one of '
                       f'{MAX_POOLS}.')
    if self.pointwise_conv not in POINTWISE_CONVS:
      raise ValueError(f'config.model.backbone.pointwise_conv={self.pointwise_conv!r}; use '
                       f'one of {POINTWISE_CONVS}.')
    relu = _relu(self.relu)
    block_cls = Bottleneck if self.block == 'bottleneck' else BasicBlock
    x = x.astype(self.dtype)
    stem_kernel = 7 if self.stem == 'imagenet' else 3
    if self.stem_conv == 'row_fold':
      x = RowFoldedConv(self.width, stem_kernel, 2, self.dtype, name='conv1')(x)
    else:
      x = _conv(self.width, stem_kernel, 2, self.dtype, 'conv1')(x)
    x = relu(_norm(self.norm, train, self.dtype, 'bn1', channels=self.width)(x))
    if self.stem == 'imagenet' and self.max_pool == 'unrolled':
      x = unrolled_max_pool(x, 3, 2, 1)
    elif self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    dilation = 1
    last = len(self.stage_sizes) - 1
    for i, num_blocks in enumerate(self.stage_sizes):
      stride = 1 if i == 0 else 2
      first_dilation = dilation  # torchvision: the first block keeps the old dilation
      if self.dilation and i == last and stride == 2:
        dilation, stride = dilation * 2, 1
      for j in range(num_blocks):
        x = block_cls(
            self.width * 2 ** i, stride=stride if j == 0 else 1,
            dilation=first_dilation if j == 0 else dilation, norm=self.norm,
            pointwise_conv=self.pointwise_conv, relu=self.relu, dtype=self.dtype,
            name=f'layer{i + 1}_{j}')(x, train=train)
    return x
