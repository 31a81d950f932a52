"""ResNet backbone: torchvision-layout equivalence with a plain PyTorch ResNet, counts."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from e2e_vlp.materialize import materialized
from e2e_vlp.models import resnet

torch.set_num_threads(1)


# ---- an independent PyTorch ResNet (torchvision's architecture and names) ---------------

class TorchBasic(tnn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, dilation, downsample):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(tnn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, dilation, downsample):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(tnn.Module):
  """torchvision.models.ResNet without avgpool/fc, plus the 'small' stem."""

  def __init__(self, block, stage_sizes, width, stem, dilate_last):
    super().__init__()
    block_cls = TorchBottleneck if block == 'bottleneck' else TorchBasic
    kernel = 7 if stem == 'imagenet' else 3
    self.conv1 = tnn.Conv2d(3, width, kernel, 2, kernel // 2, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.pool = tnn.MaxPool2d(3, 2, 1) if stem == 'imagenet' else tnn.Identity()
    self.inplanes, self.dilation = width, 1
    self.num_stages = len(stage_sizes)
    for i, n in enumerate(stage_sizes):
      dilate = dilate_last and i == len(stage_sizes) - 1 and i > 0
      setattr(self, f'layer{i + 1}',
              self._make_layer(block_cls, width * 2 ** i, n, 1 if i == 0 else 2, dilate))

  def _make_layer(self, block_cls, planes, blocks, stride, dilate):
    previous_dilation = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    downsample = None
    if stride != 1 or self.inplanes != planes * block_cls.expansion:
      downsample = tnn.Sequential(
          tnn.Conv2d(self.inplanes, planes * block_cls.expansion, 1, stride, bias=False),
          tnn.BatchNorm2d(planes * block_cls.expansion))
    layers = [block_cls(self.inplanes, planes, stride, previous_dilation, downsample)]
    self.inplanes = planes * block_cls.expansion
    layers += [block_cls(self.inplanes, planes, 1, self.dilation, None)
               for _ in range(1, blocks)]
    return tnn.Sequential(*layers)

  def forward(self, x):
    x = self.pool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_stages):
      x = getattr(self, f'layer{i + 1}')(x)
    return x


def torch_to_flax(state_dict, frozen_bn: bool) -> dict:
  """torchvision names -> our variables: layerI.J -> layerI_J, downsample.0/1 -> _conv/_bn."""
  params, stats = {}, {}
  bn_affine = stats if frozen_bn else params
  for key, value in state_dict.items():
    parts = key.split('.')
    if parts[-1] == 'num_batches_tracked':
      continue
    if parts[0].startswith('layer'):
      parts = [f'{parts[0]}_{parts[1]}'] + parts[2:]
    if 'downsample' in parts:
      i = parts.index('downsample')
      parts = parts[:i] + [('downsample_conv', 'downsample_bn')[int(parts[i + 1])]] + parts[i + 2:]
    *module, leaf = parts
    value = value.detach().numpy()
    if leaf == 'weight' and value.ndim == 4:
      target, name, value = params, 'kernel', value.transpose(2, 3, 1, 0)
    else:
      target, name = {'weight': (bn_affine, 'scale'), 'bias': (bn_affine, 'bias'),
                      'running_mean': (stats, 'mean'), 'running_var': (stats, 'var')}[leaf]
    node = target
    for m in module:
      node = node.setdefault(m, {})
    node[name] = jnp.asarray(value)
  return {'params': params, 'batch_stats': stats}


def _randomize_bn(model: tnn.Module):
  gen = torch.Generator().manual_seed(1)
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      c = m.num_features
      m.weight.data = 1 + 0.2 * torch.randn(c, generator=gen)
      m.bias.data = 0.2 * torch.randn(c, generator=gen)
      m.running_mean.data = 0.2 * torch.randn(c, generator=gen)
      m.running_var.data = 0.5 + torch.rand(c, generator=gen)


XLA_FORMS = ('conv', 'reduce_window', 'conv', 'plain')
CPU_FORMS = ('row_fold', 'unrolled', 'dot', 'materialized')
CASES = [
    # block, stage_sizes, width, stem, dilation, frozen_bn, train,
    # (stem_conv, max_pool, pointwise_conv, relu)
    ('basic', (2, 1, 1, 1), 8, 'small', False, True, False, XLA_FORMS),
    ('bottleneck', (1, 2, 2), 4, 'imagenet', True, True, False, XLA_FORMS),
    ('basic', (1, 2), 8, 'small', False, False, True, XLA_FORMS),  # trainable BN, batch stats
    ('basic', (1, 1), 8, 'small', False, True, False, CPU_FORMS),
    ('bottleneck', (1, 2, 2), 4, 'imagenet', True, True, False, CPU_FORMS),
]


@pytest.mark.parametrize('block,stages,width,stem,dilation,frozen,train,impl', CASES)
def test_matches_pytorch(block, stages, width, stem, dilation, frozen, train, impl):
  torch.manual_seed(0)
  ref = TorchResNet(block, stages, width, stem, dilation)
  _randomize_bn(ref)
  ref.train(train)
  image = np.random.default_rng(0).normal(size=(2, 37, 42, 3)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(image.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)

  model = resnet.ResNet(block=block, stage_sizes=stages, width=width, stem=stem,
                        dilation=dilation, norm='frozen_bn' if frozen else 'batch_norm',
                        stem_conv=impl[0], max_pool=impl[1], pointwise_conv=impl[2],
                        relu=impl[3])
  variables = torch_to_flax(ref.state_dict(), frozen)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), image))
  assert jax.tree.map(lambda x: x.shape, variables) == jax.tree.map(lambda x: x.shape, abstract)
  if train:
    got, _ = model.apply(variables, image, train=True, mutable=['batch_stats'])
  else:
    got = model.apply(variables, image)
  stride = model.output_stride
  assert got.shape == (2, math.ceil(37 / stride), math.ceil(42 / stride), model.out_channels)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


def test_cpu_forms_gradients_match_pytorch():
  """'row_fold' + 'unrolled' + 'dot' + 'materialized' back-propagate as torch's convs,
  max-pool and ReLU do, to every kernel and to the image. Odd sizes: the folded rows, the
  pool's padding and the strided 1x1 shortcut must line up; the bottleneck's 1x1 convs both
  widen and narrow the channels, and `_channel_product`'s kernel gradient must hold for
  both."""
  torch.manual_seed(0)
  ref = TorchResNet('bottleneck', (1, 1), 4, 'imagenet', False)
  _randomize_bn(ref)
  ref.eval()
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, 29, 34, 3)).astype(np.float32)
  weights = rng.normal(size=(2, 4, 5, 32)).astype(np.float32)  # d(loss)/d(output)
  torch_image = torch.from_numpy(image.transpose(0, 3, 1, 2)).requires_grad_()
  out = ref(torch_image)
  (out * torch.from_numpy(weights.transpose(0, 3, 1, 2))).sum().backward()

  model = resnet.ResNet(block='bottleneck', stage_sizes=(1, 1), width=4, stem='imagenet',
                        stem_conv='row_fold', max_pool='unrolled', pointwise_conv='dot',
                        relu='materialized')
  variables = torch_to_flax(ref.state_dict(), True)

  def loss(params, image):
    return jnp.sum(model.apply({**variables, 'params': params}, image) * weights)

  grad_params, grad_image = jax.grad(loss, argnums=(0, 1))(variables['params'], image)
  expected = torch_to_flax({k: p.grad for k, p in ref.named_parameters()}, True)['params']
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_got = jax.tree_util.tree_flatten_with_path(grad_params)[0]
  assert [path[-1].key for path, _ in flat_got] == ['kernel'] * 9  # stem + 2 blocks x 4
  for path, got in flat_got:
    np.testing.assert_allclose(np.asarray(got), np.asarray(flat_expected[path]), atol=1e-4,
                               rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(np.asarray(grad_image),
                             torch_image.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_materialized_is_the_identity_bit_for_bit_with_the_identity_derivative():
  """Normal floats of every magnitude (and -0, the largest float) come back as the same
  bits, in float32 and bfloat16; after a ReLU, subnormals too (XLA:CPU flushes them to zero
  in any arithmetic, `nn.relu` included); gradients and tangents pass through unchanged."""
  info = np.finfo(np.float32)
  special = np.array([0.0, -0.0, 1.0, -2.5, info.tiny, -info.tiny, info.max, -info.max],
                     np.float32)
  normal = np.concatenate([special, np.random.default_rng(0).normal(size=64).astype(
      np.float32) * 10.0 ** np.arange(-32, 32).astype(np.float32)])
  subnormal = np.array([info.tiny / 8, -info.tiny / 3, 7.0e-45], np.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.asarray(normal, dtype)
    x = x[jnp.isfinite(x)]  # float32's largest rounds to inf in bfloat16
    got = jax.jit(materialized)(x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(x).view(np.uint8))
  everything = jnp.asarray(np.concatenate([normal, subnormal]))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda x: materialized(nn.relu(x)))(everything)).view(np.uint8),
      np.asarray(jax.jit(nn.relu)(everything)).view(np.uint8))
  weights = np.random.default_rng(1).normal(size=normal.shape).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(materialized(x) * weights))(jnp.asarray(normal))
  np.testing.assert_array_equal(np.asarray(grad), weights)
  primal, tangent = jax.jvp(materialized, (jnp.asarray(normal),), (jnp.asarray(weights),))
  np.testing.assert_array_equal(np.asarray(primal), normal)
  np.testing.assert_array_equal(np.asarray(tangent), weights)


@pytest.mark.parametrize('backend,divides', [('cpu', True), ('gpu', False), ('tpu', False)])
def test_materialized_relu_only_on_the_cpu_backend(monkeypatch, backend, divides):
  """The XLA:CPU work-around (a divide per ReLU output) stays out of GPU and TPU graphs."""
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  model = resnet.ResNet(block='basic', stage_sizes=(1,), width=4, relu='materialized')
  image = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), image)
  jaxpr = str(jax.make_jaxpr(model.apply)(variables, image))
  assert ('div ' in jaxpr) == divides


@pytest.mark.parametrize('field', ['stem_conv', 'max_pool', 'pointwise_conv', 'relu'])
def test_unknown_implementation_is_named(field):
  model = resnet.ResNet(block='basic', stage_sizes=(1,), width=4, **{field: 'avg'})
  with pytest.raises(ValueError, match=f'backbone.{field}'):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _backbone_count(variables) -> int:
  """Conv kernels + BN scale/bias: the count torchvision reports as trainable."""
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  return sum(int(np.prod(x.shape)) for path, x in flat
             if path[-1].key in ('kernel', 'scale', 'bias'))


def test_resnet50_parameter_count():
  block, stages = resnet.resnet_stages(50)
  model = resnet.ResNet(block=block, stage_sizes=stages)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  torch_model = TorchResNet(block, stages, 64, 'imagenet', False)
  torch_count = sum(p.numel() for p in torch_model.parameters())
  # torchvision resnet50 has 25,557,032 parameters; its fc layer has 2048 * 1000 + 1000.
  assert torch_count == 25_557_032 - (2048 * 1000 + 1000) == 23_508_032
  assert _backbone_count(abstract) == torch_count
  param_leaves = jax.tree_util.tree_flatten_with_path(abstract['params'])[0]
  assert {path[-1].key for path, _ in param_leaves} == {'kernel'}  # frozen BN: no BN params


def test_resnet_stages():
  assert resnet.resnet_stages(18) == ('basic', (2, 2, 2, 2))
  assert resnet.resnet_stages(101) == ('bottleneck', (3, 4, 23, 3))
  with pytest.raises(ValueError, match='No ResNet-20'):
    resnet.resnet_stages(20)


@pytest.mark.parametrize('stem,dilation,stride', [
    ('imagenet', False, 32), ('imagenet', True, 16), ('small', False, 16), ('small', True, 8)])
def test_output_stride_and_grid(stem, dilation, stride):
  model = resnet.ResNet(block='basic', stage_sizes=(1, 1, 1, 1), width=4, stem=stem,
                        dilation=dilation)
  assert model.output_stride == stride
  x = jnp.zeros((1, 100, 65, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert out.shape == (1, math.ceil(100 / stride), math.ceil(65 / stride), 32)


def test_group_norm_blocks_start_as_the_identity():
  """Zero-initialised last norm of each residual branch: a block maps x >= 0 to x."""
  x = jnp.abs(jax.random.normal(jax.random.key(1), (2, 8, 8, 32)))
  for block in (resnet.BasicBlock(32, norm='group_norm'),
                resnet.Bottleneck(8, norm='group_norm')):
    variables = block.init(jax.random.key(0), x, train=False)
    np.testing.assert_allclose(block.apply(variables, x, train=False), x, atol=1e-6)
