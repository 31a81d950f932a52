"""Orbax checkpoints of the train state plus each host's data-iterator state.

A step directory holds two items: `state` (the sharded TrainState, written by every host
in parallel, asynchronously) and `data` (one opaque blob per process: the tf.data
iterator, so a resumed run sees exactly the batches it would have seen, plus the process
count and the step its data stream started at). Orbax writes a step into a temporary
directory and renames it when complete, so a step that exists is whole; a step that is
present but unreadable (a truncated file, a deleted shard) is skipped on restore in favour
of the previous one, and the reason is logged.

The train state restores onto any mesh and process count (orbax re-shards it); a data
position does not: each process reads its own share of the data, and the shares change
with the process count. Such a step is restored without its data state (one warning), and
the loop restarts the data stream with a seed folded from the step (`data_seed`), so the
examples of the first steps are not replayed.
"""

import contextlib
import dataclasses
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
# The per-host array metadata store orbax's default jax.Array handler writes; orbax-checkpoint
# 0.12 gives it no public name.
from orbax.checkpoint._src.metadata import array_metadata_store


@dataclasses.dataclass(frozen=True)
class DataState:
  """One process' data-iterator position and where its stream began.

  blob: `DatasetIterator.get_state()`, meaningful only in a pipeline built with the same
    seed for the same process share.
  stream_start: the step the stream started at: 0, or the step a resume restarted it at
    (the pipeline's seed is `data_seed(config.train.seed, stream_start)`).
  """
  blob: bytes
  stream_start: int = 0


@dataclasses.dataclass(frozen=True)
class SavedDataState:
  """What a checkpoint holds for this process: its DataState, None when there is none."""
  state: DataState | None
  process_count: int


def data_seed(seed: int, stream_start: int) -> int:
  """The data pipeline's seed for a stream started at step `stream_start`.

  `seed` itself for a stream started at 0 (a run and its exact resumes); any other start
  gives an unrelated seed, so a restarted stream shuffles afresh instead of replaying.
  """
  if stream_start == 0:
    return seed
  return int(np.random.SeedSequence([seed % 2**64, stream_start]).generate_state(1)[0])


class DataStateHandler(ocp.CheckpointHandler):
  """Per process: `process_<i>.bin` (the blob), `process_<i>.json` (count, stream start).

  Directories written before the JSON files existed read as written by as many processes as
  they hold blobs, with streams started at 0.
  """

  def save(self, directory: epath.Path, args: 'DataStateSave'):
    directory.mkdir(parents=True, exist_ok=True)
    index = jax.process_index()
    (directory / f'process_{index}.bin').write_bytes(args.state.blob)
    (directory / f'process_{index}.json').write_text(json.dumps(
        {'process_count': jax.process_count(), 'stream_start': args.state.stream_start}))

  def restore(self, directory: epath.Path, args: 'DataStateRestore | None' = None
              ) -> SavedDataState:
    index = jax.process_index()
    blob_path = directory / f'process_{index}.bin'
    metadata_paths = sorted(directory.glob('process_*.json'))
    if not metadata_paths:
      process_count = len(list(directory.glob('process_*.bin')))
      own = {'stream_start': 0} if blob_path.exists() else None
    else:
      own_path = directory / f'process_{index}.json'
      own = json.loads(own_path.read_text()) if own_path.exists() else None
      process_count = (own or json.loads(metadata_paths[0].read_text()))['process_count']
    if own is None or not blob_path.exists() or process_count != jax.process_count():
      return SavedDataState(None, process_count)
    return SavedDataState(DataState(blob_path.read_bytes(), own['stream_start']),
                          process_count)


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: DataState


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a model with other parameter shapes."""


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))[0]
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
          if hasattr(leaf, 'shape')}


def _key_name(key: Any) -> str:
  """'params', 'mu', '2' for dict keys, attributes and sequence indices alike."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _check_shapes(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  step: int, directory: Any):
  differences = [f'{k}: saved {saved.get(k, "missing")}, config {expected.get(k, "missing")}'
                 for k in sorted(set(saved) | set(expected))
                 if k.startswith(('params/', 'constants/')) and saved.get(k) != expected.get(k)]
  if differences:
    raise CheckpointMismatchError(
        f'{directory} holds a checkpoint (step {step}) of a different model: '
        + '; '.join(differences[:3]) + (f' and {len(differences) - 3} more' if len(
            differences) > 3 else '')
        + '. Use another --workdir, or the config that checkpoint was trained with.')


def state_handler(replica_parallel_min_bytes: int) -> ocp.PyTreeCheckpointHandler:
  """orbax's pytree handler, saving an array replica-parallel only when each replica's
  slice holds at least `replica_parallel_min_bytes`.

  Replica-parallel saving splits a replicated array into one slice per replica, and each
  slice is an eager `jax.Array` slice that jit compiles once per (shape, device): with
  orbax's default (every array, however small) the first save of the `tiny` state (1,021
  arrays, 38 MiB) on 8 CPU devices took 13 s and later saves 4.4 s; with a 1 MiB floor
  2.0 s and 1.5 s (`python bench/checkpoint_save.py`). Large arrays keep replica-parallel
  writes, which spread a pod's saves over its hosts.
  """
  arrays = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=replica_parallel_min_bytes,
      array_metadata_store=array_metadata_store.Store())
  registry = ocp.type_handlers.create_type_handler_registry(
      *[(t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, np.number, np.ndarray)],
      (jax.Array, arrays))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
  """Keeps the last `keep` steps under `<workdir>/checkpoints`.

  replica_parallel_min_bytes: see `state_handler`
  (`config.train.checkpoint_replica_parallel_min_bytes`).
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True,
               replica_parallel_min_bytes: int = 1 << 20):
    self.directory = epath.Path(workdir) / 'checkpoints'
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True),
        item_names=('state', 'data'),
        item_handlers={'state': state_handler(replica_parallel_min_bytes),
                       'data': DataStateHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: DataState | None = None, *,
           force: bool = False) -> bool:
    items = {'state': ocp.args.PyTreeSave(state)}
    if data_state is not None:
      items['data'] = DataStateSave(data_state)
    if step in self._manager.all_steps():  # unreadable on restore (skipped), now retrained
      self._manager.delete(step)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore_latest(self, abstract_state: Any, *, with_data: bool = True
                     ) -> tuple[int, Any, DataState | None] | None:
    """The newest readable step as (step, state, data state); None when there is none.

    The data state is None when the step has none this run can use (see `restore`); that
    is no reason to fall back to an older step. Raises CheckpointMismatchError when the
    newest readable step holds a different model.
    """
    for step in reversed(self.all_steps()):
      try:
        saved = _shapes(self._manager.item_metadata(step)['state'])
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint at step %d in %s has unreadable metadata (%s: %s); '
                        'falling back to the previous one.', step, self.directory,
                        type(e).__name__, e)
        continue
      _check_shapes(saved, _shapes(abstract_state), step, self.directory)
      try:
        return (step,) + self.restore(step, abstract_state, with_data=with_data)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint at step %d in %s cannot be restored (%s: %s); '
                        'falling back to the previous one.', step, self.directory,
                        type(e).__name__, e)
    return None

  def restore(self, step: int, abstract_state: Any, *, with_data: bool = True
              ) -> tuple[Any, DataState | None]:
    """(state, this process' data state) of `step`, the state laid out as `abstract_state`.

    The data state is None when the step has none, or when it was written by another
    number of processes (logged as a warning): the caller restarts the data stream.
    """
    items = {'state': ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    has_data = with_data and (self.directory / str(step) / 'data').exists()
    if has_data:
      items['data'] = DataStateRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if not has_data:
      return restored['state'], None
    saved = restored['data']
    if saved.state is None:
      reason = (f'was written by {saved.process_count} processes and this run has '
                f'{jax.process_count()}' if saved.process_count != jax.process_count() else
                f'has no data state for process {jax.process_index()}')
      logging.warning(
          'Checkpoint at step %d in %s %s: the model and optimizer state are restored '
          '(re-sharded onto this run\'s devices), but the data-iterator positions cannot be '
          'mapped, so the data stream restarts with a fresh shuffle (seeded from step %d) '
          'instead of continuing where it stopped.', step, self.directory, reason, step)
    return restored['state'], saved.state

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def checkpoints_dir(path: str) -> epath.Path:
  """`path` itself, or its `checkpoints` folder when `path` is a workdir."""
  directory = epath.Path(path)
  return directory / 'checkpoints' if (directory / 'checkpoints').exists() else directory


def load_params(path: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """Parameters of checkpoint `step` (default: the newest readable one) under `path`.

  `path` is a workdir or its checkpoints dir. Restored as host numpy arrays from any mesh,
  for `init_from` and export: {'params', 'constants'}.
  """
  directory = checkpoints_dir(path)
  # Without a registered handler item_metadata is None and the restore falls back to the
  # saved shardings, which fails on another topology (e.g. a multi-process checkpoint).
  manager = ocp.CheckpointManager(directory, item_names=('state', 'data'),
                                  item_handlers={'state': ocp.PyTreeCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  with contextlib.closing(manager):
    return _load_params(manager, directory, path, step)


def _load_params(manager: ocp.CheckpointManager, directory: epath.Path, path: str,
                 step: int | None) -> tuple[int, dict[str, Any]]:
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f'No checkpoint found under {path}.')
  if step is not None and step not in steps:
    raise FileNotFoundError(f'No checkpoint step {step} under {directory}; steps: {steps}.')
  errors = []
  for candidate in ([step] if step is not None else reversed(steps)):
    try:
      metadata = manager.item_metadata(candidate)['state']
      target = jax.tree.map(
          lambda m: ocp.RestoreArgs(restore_type=np.ndarray), metadata,
          is_leaf=lambda m: hasattr(m, 'shape'))
      restored = manager.restore(candidate, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=None, restore_args=target)))
      return candidate, {'params': restored['state']['params'],
                         'constants': restored['state'].get('constants', {})}
    except Exception as e:  # pylint: disable=broad-except
      if step is not None:
        raise
      errors.append(f'step {candidate}: {type(e).__name__}: {e}')
      logging.warning('Cannot read checkpoint step %d under %s: %s', candidate, path, e)
  raise ValueError(f'No readable checkpoint under {path}: ' + '; '.join(errors))
