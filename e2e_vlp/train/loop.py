"""The training loop, read top to bottom: config -> mesh -> task -> state -> loop.

Task-agnostic: a task (e2e_vlp/tasks) supplies the model, the loss, the data and the
evaluation; this file supplies the mesh, sharding, optimizer, checkpoints, metrics,
resumption and the safety checks.
"""

import collections
import json
import os
import shutil
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from e2e_vlp import tasks
from e2e_vlp.train import checkpoint as ckpt_lib
from e2e_vlp.train import compile_cache
from e2e_vlp.train import config_checks
from e2e_vlp.train import mesh as mesh_lib
from e2e_vlp.train import metrics as metrics_lib
from e2e_vlp.train import optimizer as optimizer_lib
from e2e_vlp.train import preemption
from e2e_vlp.train import sharding
from e2e_vlp.train import state as state_lib


class NonFiniteLossError(RuntimeError):
  """Too many consecutive updates with a non-finite loss or gradient."""


class StepsInFlight:
  """Keeps at most `limit` dispatched steps unfinished by waiting for the oldest.

  JAX dispatches asynchronously, and the loop otherwise waits for the device only when it
  logs: between logs the host ran ~30 steps ahead in the default run, each holding its
  batch, and a preemption signal then waited for all of them before the checkpoint (a
  SIGTERM took 13 s to a saved checkpoint, ~10 s of it those steps). With a small limit
  the device still always has the next step queued.
  """

  def __init__(self, limit: int):
    self.limit = limit
    self._queue: collections.deque[Any] = collections.deque()

  def push(self, outputs: Any) -> None:
    """Records one dispatched step by its outputs; blocks while more than `limit` remain."""
    self._queue.append(outputs)
    while len(self._queue) > self.limit:
      jax.block_until_ready(self._queue.popleft())


def default_workdir(config: ml_collections.ConfigDict) -> str:
  return config.workdir or os.path.join('workdirs', f'{config.task}_{config.variant}')


def merge_init_params(target: Any, source: Any) -> tuple[Any, list[str], list[str]]:
  """Takes source leaves whose path and shape match the target's.

  Returns (merged tree, paths newly initialised, source paths unused).
  """
  flat_target = traverse_util.flatten_dict(target, sep='/')
  flat_source = traverse_util.flatten_dict(source, sep='/')
  merged, new = {}, []
  for path, value in flat_target.items():
    src = flat_source.get(path)
    if src is not None and tuple(np.shape(src)) == tuple(value.shape):
      merged[path] = src
    else:
      merged[path] = value
      new.append(path)
  unused = sorted(set(flat_source) - set(flat_target))
  return traverse_util.unflatten_dict(merged, sep='/'), sorted(new), unused


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


def _mean_metrics(history: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Means over the finite steps of a log interval."""
  finite = [h for h in history if not h['nonfinite']] or history
  return {k: float(np.mean([h[k] for h in finite])) for k in finite[0]}


def run(config: ml_collections.ConfigDict, workdir: str | None = None, *,
        stop_after: int | None = None, batch_hook=None) -> dict[str, Any]:
  """Trains `config.task` in `workdir`, resuming from its newest checkpoint.

  stop_after: leave the loop after this step (a simulated interruption, for tests);
  batch_hook: `fn(step, local_batch) -> local_batch` applied to every batch (tests inject
  NaNs with it). Returns the last logged and evaluated metrics.
  """
  # ----------------------------------------------------------------- config & workdir
  workdir = os.path.abspath(workdir or default_workdir(config))  # orbax needs absolute paths
  config_checks.validate(config, jax.device_count(), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  with compile_cache.persistent(
      compile_cache.resolve(config.train.compilation_cache_dir, workdir)) as cache_dir:
    logging.info('Persistent compilation cache: %s.', cache_dir or 'off')
    return _train(config, workdir, stop_after, batch_hook)


def _train(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None,
           batch_hook) -> dict[str, Any]:
  """`run`'s loop, in the resolved workdir under the compilation cache."""
  # ----------------------------------------------------------------------------- mesh
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.sharding)
  logging.info('Mesh %s over %d devices (%d processes), sharding %r.', dict(mesh.shape),
               jax.device_count(), jax.process_count(), config.sharding)

  # ----------------------------------------------------------------------------- task
  task = tasks.get_task(config)
  total_steps = config.train.total_steps
  data = getattr(task, 'data', None)
  if data is not None and jax.process_index() == 0:  # export finds the vocabulary here
    shutil.copyfile(data.vocab_path, os.path.join(workdir, 'vocab.txt'))

  # ------------------------------------------------- abstract state, shardings, optimizer
  tx, schedule, abstract_state, shardings = state_lib.plan_train_state(
      task.init_variables, config.optim, total_steps, mesh, rules)
  logging.info('Optimizer groups: %s', optimizer_lib.describe_groups(config.optim,
                                                                      abstract_state.params))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
  logging.info('Model: %s parameters.', f'{num_params:,}')

  # ------------------------------------------------------- compiled step, state, data
  # The step compiles from the abstract state on a worker thread while this thread restores
  # or initialises the state and builds the input pipeline (state_lib.in_background).
  batch_spec = task.batch_spec(config.train.batch_size)
  frozen = optimizer_lib.frozen_mask(config.optim, abstract_state.params)
  train_step = state_lib.make_train_step(
      task.loss_fn, tx, schedule, grad_accum_steps=config.optim.grad_accum_steps,
      seed=config.train.seed, frozen=frozen)
  with state_lib.in_background(_compile_step, train_step, shardings, mesh, rules,
                                abstract_state, batch_spec, config.train) as compiling:
    checkpointer = ckpt_lib.Checkpointer(
        workdir, keep=config.train.keep_checkpoints,
        replica_parallel_min_bytes=config.train.checkpoint_replica_parallel_min_bytes)
    restored = checkpointer.restore_latest(
        ckpt_lib.abstract_with_shardings(abstract_state, shardings))
    if restored is not None:
      start_step, state, data_state = restored
      logging.info('Resumed from step %d in %s.', start_step, checkpointer.directory)
    else:
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = state_lib.create_train_state(task.init_variables, tx,
                                             jax.random.key(config.train.seed), shardings)
      start_step, data_state = 0, None
      if config.init_from:
        state = _init_from(config.init_from, state, shardings)
    # A saved position continues its stream; without one (another process count) the
    # stream restarts here, under a seed of its own so that it does not replay the first
    # batches.
    stream_start = data_state.stream_start if data_state is not None else start_step
    data_iter = task.train_iterator(seed=ckpt_lib.data_seed(config.train.seed, stream_start))
    if data_state is not None:
      data_iter.set_state(data_state.blob)
    compiled, compile_seconds = compiling.result()
  step_flops = _flops(compiled)
  logging.info('Step compiled in %.1fs (%.3g GFLOP per step).', compile_seconds,
               step_flops / 1e9 if step_flops else float('nan'))

  # --------------------------------------------------------------------------- loop
  logger = metrics_lib.MetricsLogger(workdir, total_steps)
  logger.start(start_step)
  history: list[dict[str, Any]] = []
  last: dict[str, Any] = {'compile_seconds': compile_seconds}
  streak = 0
  step = start_step
  interval_start, interval_step = time.time(), step
  stop = min(total_steps, stop_after) if stop_after is not None else total_steps
  in_flight = StepsInFlight(config.train.max_steps_in_flight)
  with preemption.PreemptionWatcher() as watcher:
    try:
      while step < stop:
        local = next(data_iter)
        if batch_hook is not None:
          local = batch_hook(step, local)
        skipped_records = local.pop('skipped_records', None)
        batch = mesh_lib.global_batch({k: local[k] for k in batch_spec}, mesh)
        state, step_metrics = compiled(state, batch)
        in_flight.push(step_metrics)
        history.append(step_metrics)
        step += 1

        log_now = step % config.train.log_every == 0 or step == total_steps
        save_now = step % config.train.checkpoint_every == 0 or step == total_steps
        if log_now or save_now:
          fetched = [jax.device_get(h) for h in history]
          history = []
          for offset, values in enumerate(fetched):
            streak = streak + 1 if values['nonfinite'] else 0
            if streak >= config.train.max_consecutive_nonfinite:
              bad = metrics_lib.nonfinite_terms(
                  {k: float(v) for k, v in values.items()})
              raise NonFiniteLossError(
                  f'{streak} consecutive steps with a non-finite loss or gradient, the last '
                  f'at step {step - len(fetched) + offset + 1}; non-finite terms: '
                  f'{", ".join(bad) or "gradients"}. Lower config.optim.lr or check the data.')
          if log_now:
            elapsed = time.time() - interval_start
            steps_done = step - interval_step
            values = _mean_metrics(fetched)
            values.update(
                steps_per_second=steps_done / elapsed,
                examples_per_second=steps_done * config.train.batch_size / elapsed,
                skipped_updates=int(jax.device_get(state.skipped)),
                skipped_records=int(skipped_records) if skipped_records is not None else 0)
            if step_flops:
              values['gflops_per_second'] = step_flops * steps_done / elapsed / 1e9
              if config.train.peak_flops:
                values['mfu'] = (step_flops * steps_done / elapsed
                                 / (config.train.peak_flops * jax.device_count()))
            last.update(logger.write(step, values))
            logger.progress(step, values)
            interval_start, interval_step = time.time(), step

          if save_now:
            _save(checkpointer, step, state, data_iter, stream_start)

        if watcher.should_stop():
          if not save_now:
            _save(checkpointer, step, state, data_iter, stream_start)
          checkpointer.wait()
          logging.warning('Stopped at step %d on a preemption signal; checkpoint saved in %s.',
                          step, checkpointer.directory)
          last['preempted'] = True
          break

        if step % config.train.eval_every == 0 or step == total_steps:
          eval_values = task.evaluate(state.params, state.constants, step=step, workdir=workdir,
                                      mesh=mesh, rules=rules)
          last.update(logger.write(step, eval_values, prefix='eval/'))
          logging.info('eval step %d: %s', step, json.dumps(
              {k: round(v, 4) for k, v in eval_values.items() if isinstance(v, float)}))
          interval_start = time.time()
    finally:
      checkpointer.close()
      logger.close()
  last['step'] = step
  return last


def _compile_step(*args: Any) -> tuple[Any, float]:
  """`state_lib.compile_train_step(*args)` -> (executable, seconds)."""
  start = time.time()
  compiled = state_lib.compile_train_step(*args)
  return compiled, time.time() - start


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _save(checkpointer: ckpt_lib.Checkpointer, step: int, state: state_lib.TrainState,
          data_iter, stream_start: int) -> None:
  """Saves, unless the parameters hold a non-finite value (never checkpoint those)."""
  if not bool(_all_finite(state.params)):
    raise NonFiniteLossError(
        f'Step {step}: the parameters hold non-finite values; not saving them. The last '
        f'good checkpoint is step {max(checkpointer.all_steps(), default=None)}.')
  checkpointer.save(step, state, ckpt_lib.DataState(data_iter.get_state(), stream_start),
                    force=True)


def _flops(compiled) -> float:
  try:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
      analysis = analysis[0]
    return float(analysis.get('flops', 0.0))
  except Exception:  # pylint: disable=broad-except
    return 0.0


def _init_from(path: str, state: state_lib.TrainState,
               shardings: state_lib.TrainState) -> state_lib.TrainState:
  """Loads the parameters that exist (same path and shape) in a checkpoint at `path`."""
  source_step, source = ckpt_lib.load_params(path)
  params, new, unused = merge_init_params(jax.device_get(state.params), source['params'])
  constants, new_constants, _ = merge_init_params(jax.device_get(state.constants),
                                                  source['constants'])
  logging.info('init_from %s (step %d): %d parameters loaded; newly initialised: %s; '
               'unused from the checkpoint: %s', path, source_step,
               len(jax.tree.leaves(params)) - len(new), new or 'none', unused or 'none')
  return state.replace(params=_with_shardings(params, shardings.params),
                       constants=_with_shardings(constants, shardings.constants))

