"""Starts JAX's multi-controller runtime when the environment asks for it.

Every host runs the same command; `jax.distributed.initialize` connects them before any
device is touched. Recognised, in order: explicit values (flags or E2E_VLP_COORDINATOR,
E2E_VLP_NUM_PROCESSES, E2E_VLP_PROCESS_ID), a SLURM job step with several tasks, a
multi-host Cloud TPU slice. A single process needs nothing.
"""

import os

import jax
from absl import logging


def _multihost_tpu() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def initialize_from_environment(coordinator_address: str | None = None,
                                num_processes: int | None = None,
                                process_id: int | None = None) -> bool:
  """Returns True when a multi-process runtime was started."""
  env = os.environ
  coordinator_address = coordinator_address or env.get('E2E_VLP_COORDINATOR')
  if num_processes is None and 'E2E_VLP_NUM_PROCESSES' in env:
    num_processes = int(env['E2E_VLP_NUM_PROCESSES'])
  if process_id is None and 'E2E_VLP_PROCESS_ID' in env:
    process_id = int(env['E2E_VLP_PROCESS_ID'])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError('A coordinator address needs the number of processes and this '
                       "process' id (E2E_VLP_NUM_PROCESSES / E2E_VLP_PROCESS_ID or flags).")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif int(env.get('SLURM_NTASKS', '1')) > 1 or _multihost_tpu():
    jax.distributed.initialize()  # reads SLURM / Cloud TPU metadata itself
  else:
    return False
  logging.info('Process %d of %d, %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
