"""Checks a config before anything is built or compiled; each error names the field."""

import ml_collections

from e2e_vlp.models.e2e_vlp import JOINT_FUSION
from e2e_vlp.models.e2e_vlp import JOINT_VISUAL
from e2e_vlp.train import mesh as mesh_lib
from e2e_vlp.train import sharding
from e2e_vlp.train import state as state_lib


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1):
  """Raises ConfigError for the first problem found."""
  m, t, d = config.model, config.train, config.data
  try:
    shape = dict(zip(sharding.MESH_AXES, mesh_lib.mesh_shape(config.mesh, num_devices)))
    sharding.logical_axis_rules(config.sharding)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  data_parallel = shape['data'] * shape['fsdp']
  _require(t.batch_size > 0 and t.batch_size % data_parallel == 0,
           f'config.train.batch_size={t.batch_size} is not divisible by the data-parallel size '
           f'{data_parallel} (config.mesh data x fsdp = {shape["data"]} x {shape["fsdp"]}); '
           f'use a multiple of {data_parallel}.')
  _require(t.batch_size % process_count == 0,
           f'config.train.batch_size={t.batch_size} is not divisible by the {process_count} '
           'processes.')
  accum = config.optim.grad_accum_steps
  _require(accum >= 1 and t.batch_size % (accum * data_parallel) == 0,
           f'config.optim.grad_accum_steps={accum}: config.train.batch_size={t.batch_size} must '
           f'be divisible by grad_accum_steps x data-parallel size ({accum} x {data_parallel}).')
  _require(m.d_model % m.num_heads == 0,
           f'config.model.d_model={m.d_model} is not divisible by config.model.num_heads='
           f'{m.num_heads}.')
  if shape['model'] > 1:
    _require(m.num_heads % shape['model'] == 0,
             f'config.model.num_heads={m.num_heads} is not divisible by config.mesh.model='
             f'{shape["model"]} (tensor parallelism splits heads).')
  _require(d.max_boxes <= m.num_queries,
           f'config.data.max_boxes={d.max_boxes} exceeds config.model.num_queries='
           f'{m.num_queries}: every target needs a query.')
  _require(d.max_text_len <= m.max_text_len,
           f'config.data.max_text_len={d.max_text_len} exceeds the text position table '
           f'config.model.max_text_len={m.max_text_len}.')
  _require(d.max_caption_len <= m.max_caption_len,
           f'config.data.max_caption_len={d.max_caption_len} exceeds '
           f'config.model.max_caption_len={m.max_caption_len}.')
  ynn = t.cpu_ynn_fusion_types
  _require(ynn == state_lib.YNN_XLA_DEFAULT or set(state_lib.ynn_fusion_types(ynn)) <= set(
      state_lib.YNN_FUSION_TYPES),
           f'config.train.cpu_ynn_fusion_types={ynn!r}: use comma-separated names from '
           f"{state_lib.YNN_FUSION_TYPES}, '' for none or {state_lib.YNN_XLA_DEFAULT!r} for "
           "XLA's choice.")
  _require(t.total_steps > 0, f'config.train.total_steps={t.total_steps} must be positive.')
  for field in ('log_every', 'eval_every', 'checkpoint_every', 'max_steps_in_flight'):
    _require(t[field] > 0, f'config.train.{field}={t[field]} must be positive.')
  _require(t.checkpoint_replica_parallel_min_bytes >= 0,
           'config.train.checkpoint_replica_parallel_min_bytes='
           f'{t.checkpoint_replica_parallel_min_bytes} must be >= 0 (0: always split).')
  _require(m.backbone.norm != 'batch_norm',
           "config.model.backbone.norm='batch_norm' keeps running statistics the train step "
           "does not update; use 'frozen_bn' (pretrained) or 'group_norm' (from scratch).")
  _require(m.dtype in ('float32', 'bfloat16'),
           f"config.model.dtype={m.dtype!r}: use 'float32' or 'bfloat16'.")
  _require(m.joint_visual in JOINT_VISUAL,
           f'config.model.joint_visual={m.joint_visual!r}: use one of {JOINT_VISUAL}.')
  _require(m.joint_fusion in JOINT_FUSION,
           f'config.model.joint_fusion={m.joint_fusion!r}: use one of {JOINT_FUSION}.')
  _require(m.fusion_layers > 0, f'config.model.fusion_layers={m.fusion_layers} must be positive.')
  _require(config.loss.det.matcher in ('hungarian', 'scipy'),
           f"config.loss.det.matcher={config.loss.det.matcher!r}: use 'hungarian' or 'scipy'.")
  _require(0.0 <= d.mlm_prob < 1.0, f'config.data.mlm_prob={d.mlm_prob} must be in [0, 1).')
  _require(0.0 <= d.itm_neg_prob <= 1.0,
           f'config.data.itm_neg_prob={d.itm_neg_prob} must be in [0, 1].')
