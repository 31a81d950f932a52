"""The full pre-training step sharded over 8 CPU devices equals the 1-device step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.tasks.pretrain import batch_shapes, pretrain_losses
from e2e_vlp.train import mesh as mesh_lib
from e2e_vlp.train import sharding
from e2e_vlp.train import state as state_lib

STEPS = 3
BATCH = 8


def small_config():
  """`tiny`, shrunk further so that five compilations stay cheap."""
  config = pretrain.get_config('tiny')
  m, d = config.model, config.data
  m.d_model, m.num_heads, m.mlp_dim = 32, 4, 64
  m.encoder_layers = m.decoder_layers = m.caption_decoder_layers = m.fusion_layers = 1
  m.num_queries, m.vocab_size, m.max_text_len, m.max_caption_len = 6, 64, 12, 12
  m.backbone.width = 8
  d.image_size, d.max_boxes, d.max_text_len, d.max_caption_len = 32, 3, 10, 10
  config.optim.warmup_steps = 1  # so that every one of the three steps moves the weights
  return config


def synthetic_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A random batch obeying the data contract (valid masks, boxes, labels)."""
  spec = batch_shapes(config, BATCH)
  m = config.model
  batch = {}
  for key, s in spec.items():
    if s.dtype == jnp.bool_:
      batch[key] = np.ones(s.shape, bool)
    elif jnp.issubdtype(s.dtype, jnp.integer):
      batch[key] = rng.integers(0, 5, s.shape).astype(np.int32)
    else:
      batch[key] = rng.normal(size=s.shape).astype(np.float32)
  batch['text_ids'] = rng.integers(7, m.vocab_size, spec['text_ids'].shape).astype(np.int32)
  batch['text_mask'][:, 7:] = False
  batch['mlm_labels'] = np.where(rng.random(spec['mlm_labels'].shape) < 0.3,
                                 batch['text_ids'], -1).astype(np.int32)
  batch['itm_label'] = rng.integers(0, 2, (BATCH,)).astype(np.int32)
  batch['image_mask'][:, 24:, :] = False
  centres = rng.uniform(0.3, 0.7, spec['boxes'].shape[:-1] + (2,))
  sizes = rng.uniform(0.1, 0.3, spec['boxes'].shape[:-1] + (2,))
  batch['boxes'] = np.concatenate([centres, sizes], -1).astype(np.float32)
  batch['labels'] = rng.integers(0, m.num_classes, spec['labels'].shape).astype(np.int32)
  batch['attributes'][..., 1:] = -1
  batch['box_mask'][:, 2:] = False
  batch['box_mask'][0] = False  # an image without boxes
  return batch


def run_steps(config, mesh_shape, strategy, batches):
  mesh = mesh_lib.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)),
                            devices=jax.devices()[:int(np.prod(mesh_shape))])
  rules = sharding.logical_axis_rules(strategy)
  model = E2EVLP(config.model)
  spec = batch_shapes(config, BATCH)
  init = lambda rng: model.init({'params': rng, 'dropout': rng},
                                {k: jnp.zeros((1,) + v.shape[1:], v.dtype)
                                 for k, v in spec.items()}, train=False)

  def loss_fn(params, constants, batch, rng):
    outputs = model.apply({'params': params, **constants}, batch, train=True,
                          rngs={'dropout': rng})
    return pretrain_losses(outputs, batch, config)

  tx, schedule, _, shardings = state_lib.plan_train_state(init, config.optim, 10, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = state_lib.create_train_state(init, tx, jax.random.key(0), shardings)
    step = state_lib.jit_train_step(state_lib.make_train_step(loss_fn, tx, schedule),
                                    shardings, mesh, spec)
    losses = []
    for batch in batches:
      state, metrics = step(state, mesh_lib.global_batch(batch, mesh))
      losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params)


@pytest.fixture(scope='module')
def reference():
  config = small_config()
  rng = np.random.default_rng(0)
  batches = [synthetic_batch(config, rng) for _ in range(STEPS)]
  return config, batches, run_steps(config, (1, 1, 1), 'dp', batches)


@pytest.mark.parametrize('mesh_shape,strategy,fused_update', [
    ((8, 1, 1), 'dp', False), ((2, 4, 1), 'fsdp', False), ((2, 2, 2), 'fsdp_tp', False),
    ((2, 2, 2), 'fsdp_tp', True)])  # `base`'s AdamW form, sharded, against the optax chain
def test_sharded_steps_match_one_device(reference, mesh_shape, strategy, fused_update):
  config, batches, (ref_losses, ref_params) = reference
  config = config.copy_and_resolve_references()
  config.optim.fused_update = fused_update
  losses, params = run_steps(config, mesh_shape, strategy, batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  assert ref_losses[0] != ref_losses[-1]  # the steps did update the model
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               params, ref_params)
