"""The device mesh from `config.mesh`, and global arrays from host-local batches."""

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from e2e_vlp.train import sharding


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `-1` (at most one) and checks that the axes multiply to the device count."""
  sizes = {name: int(mesh_config[name]) for name in sharding.MESH_AXES}
  unknown = set(mesh_config) - set(sharding.MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; '
                     f'the mesh axes are {sharding.MESH_AXES}.')
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {free}.')
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f'config.mesh.{name}={size}: use a positive size or -1.')
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
          f'config.mesh: the fixed axes multiply to {fixed}, which does not divide the '
          f'{num_devices} devices; change config.mesh.'
          + '/'.join(n for n in sizes if sizes[n] != -1) + '.')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f'config.mesh {dict(sizes)} has {fixed} devices but {num_devices} are available; '
        'make the sizes multiply to the device count or set one axis (e.g. '
        'config.mesh.data) to -1.')
  return tuple(sizes[name] for name in sharding.MESH_AXES)


def make_mesh(mesh_config: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh in automatic (logical-rule driven) sharding mode."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, sharding.MESH_AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * len(shape))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(sharding.BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = 'config.train.batch_size'):
  parts = data_parallel_size(mesh)
  if global_batch_size % parts:
    raise ValueError(
        f'{field}={global_batch_size} is not divisible by the data-parallel size {parts} '
        f'(mesh data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]}); '
        f'use a multiple of {parts}.')
  if global_batch_size % jax.process_count():
    raise ValueError(f'{field}={global_batch_size} is not divisible by the '
                     f'{jax.process_count()} processes.')


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """Host-local numpy rows -> global jax.Arrays split over the data axes."""
  return {
      key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)),
                                                  np.asarray(value))
      for key, value in local_batch.items()
  }
