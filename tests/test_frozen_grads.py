"""The train step's `frozen` mask: frozen parameters get no gradient computation at all,
while every other gradient and update stays what the step computed without the mask."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.models.resnet import ResNet
from e2e_vlp.train import optimizer as optimizer_lib
from e2e_vlp.train import state as state_lib
from micro import micro_config

# DETR's frozen set: the ResNet stem and stage 1 (configs/pretrain.py at `base`).
FROZEN = (r'backbone/(conv1|layer1_\d+)/.*',)


class _BoxRegressor(nn.Module):
  """The model's backbone under the model's name, then a dense head: the micro config's
  parameter names where freezing applies, at a few seconds of compilation."""
  model_config: Any

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` -> `[B, 4]`."""
    b = self.model_config.backbone
    features = ResNet(block=b.block, stage_sizes=tuple(b.stage_sizes), width=b.width,
                      stem=b.stem, dilation=b.dilation, norm=b.norm, name='backbone')(image)
    return nn.Dense(4, name='head')(features.mean((1, 2)))


def _capture_gradients() -> optax.GradientTransformation:
  """Keeps the incoming gradients as its state and passes them on unchanged."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (grads, grads))


def _flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _micro(tmp_path):
  config = micro_config(str(tmp_path))
  config.optim.frozen = FROZEN
  config.optim.lr_mults = (('backbone/.*', 0.1),)
  return config


def test_frozen_mask_marks_the_stem_conv_and_stage_one_of_the_model(tmp_path):
  config = _micro(tmp_path)
  size = config.data.image_size
  variables = jax.eval_shape(lambda: E2EVLP(config.model).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.ones((1, size, size), bool),
      method=E2EVLP.detect))
  params = state_lib.strip_boxes(variables)['params']
  flat = _flat(optimizer_lib.frozen_mask(config.optim, params))
  assert any(flat.values())
  for key, frozen in flat.items():
    assert frozen == key.startswith(('backbone/conv1/', 'backbone/layer1_')), key


def test_frozen_parameters_skip_their_backward_pass_and_nothing_else_changes(tmp_path):
  config = _micro(tmp_path)
  model = _BoxRegressor(config.model)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = {'image': rng.normal(size=(4, size, size, 3)).astype(np.float32),
           'target': rng.uniform(size=(4, 4)).astype(np.float32)}
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch['image'][:1]))['params']

  def loss_fn(params, constants, batch, rng):
    del constants, rng
    loss = jnp.mean(jnp.square(model.apply({'params': params}, batch['image'])
                               - batch['target']))
    return loss, {}

  adamw, schedule = optimizer_lib.make_optimizer(config.optim, params, total_steps=4)
  tx = optimizer_lib.keep_state_unless_finite(optax.chain(_capture_gradients(), adamw))
  frozen = optimizer_lib.frozen_mask(config.optim, params)
  flat_frozen = _flat(frozen)
  assert any(flat_frozen.values()) and not all(flat_frozen.values())
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, constants={},
                               opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
  results = {}
  for name, mask in (('all', None), ('masked', frozen)):
    compiled = jax.jit(state_lib.make_train_step(loss_fn, tx, schedule, frozen=mask)).lower(
        state, batch).compile()
    new_state, _ = compiled(state, batch)
    new_state, metrics = compiled(new_state, batch)  # a second step: Adam's moments in play
    results[name] = (compiled.cost_analysis()['flops'], new_state, metrics)

  (flops_all, state_all, metrics_all), (flops_masked, state_masked, metrics_masked) = (
      results['all'], results['masked'])
  # The stem's and stage 1's backward convolutions are gone from the compiled step.
  assert flops_masked < 0.9 * flops_all, (flops_masked, flops_all)
  np.testing.assert_array_equal(metrics_masked['loss'], metrics_all['loss'])

  grads_all, grads_masked = _flat(state_all.opt_state[0]), _flat(state_masked.opt_state[0])
  before = _flat(params)
  after_all, after_masked = _flat(state_all.params), _flat(state_masked.params)
  for key, is_frozen in flat_frozen.items():
    if is_frozen:
      np.testing.assert_array_equal(grads_masked[key], 0.0, err_msg=key)
      np.testing.assert_array_equal(after_masked[key], before[key], err_msg=key)
    else:
      np.testing.assert_allclose(grads_masked[key], grads_all[key], rtol=1e-6, atol=1e-6,
                                 err_msg=key)
      np.testing.assert_allclose(after_masked[key], after_all[key], rtol=1e-6, atol=1e-6,
                                 err_msg=key)
  # Without the mask they were computed (then discarded by the optimizer).
  assert any(np.any(grads_all[k] != 0.0) for k, f in flat_frozen.items() if f)
  # grad_norm now measures what the optimizer uses: the trainable gradients only.
  trainable_norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64))
                               for k, g in grads_all.items() if not flat_frozen[k]))
  np.testing.assert_allclose(metrics_masked['grad_norm'], trainable_norm, rtol=1e-5)
