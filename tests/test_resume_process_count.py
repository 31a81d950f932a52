"""Resuming with another process count: the state is restored, the data stream restarts.

A checkpoint's data state is rewritten as 2 processes write it (the handler itself, run
with jax.process_index / process_count patched) and resumed by this single process. A toy
task (one matrix; a numpy data stream whose position is its state) runs through the real
loop, so the step, parameters, seeds and batches can be checked against values computed
here by hand.
"""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from e2e_vlp.train import checkpoint as ckpt_lib
from e2e_vlp.train import loop
from micro import ToyModel, micro_config

SEED = 0
WARNING = 'the data stream restarts with a fresh shuffle'


def _toy_loss(kernel: np.ndarray, x: np.ndarray) -> float:
  """The toy loss in numpy: x [B, 8], kernel [8, 16], the constant scale 2."""
  return float(np.mean((x.astype(np.float64) @ kernel * 2.0) ** 2))


class _Stream:
  """Batches `x` [8, 8] drawn from (seed, position); the position is the saved state."""

  def __init__(self, seed: int):
    self.seed, self.position = seed, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.position])
    self.position += 1
    return {'x': rng.normal(size=(8, 8)).astype(np.float32)}

  def get_state(self) -> bytes:
    return json.dumps(self.position).encode()

  def set_state(self, blob: bytes):
    self.position = json.loads(blob)


class _ToyTask:
  """What loop.run needs from a task; records the seed of every data stream it builds."""

  def __init__(self):
    self.model = ToyModel()
    self.seeds: list[int] = []

  def init_variables(self, rng):
    return self.model.init(rng, jnp.zeros((1, 8)))

  def batch_spec(self, batch_size: int):
    return {'x': jax.ShapeDtypeStruct((batch_size, 8), jnp.float32)}

  def loss_fn(self, params, constants, batch, rng):
    del rng
    loss = jnp.mean(self.model.apply({'params': params, **constants}, batch['x']) ** 2)
    return loss, {'toy_loss': loss}

  def train_iterator(self, *, seed: int) -> _Stream:
    self.seeds.append(seed)
    return _Stream(seed)

  def evaluate(self, params, constants, **kwargs):
    del params, constants, kwargs
    return {}


def _rewrite_as_two_processes(data_dir: str, monkeypatch):
  """Replaces a step's data item by what processes 0 and 1 of 2 would have written."""
  blob = (epath.Path(data_dir) / 'process_0.bin').read_bytes()
  shutil.rmtree(data_dir)
  for index in range(2):
    with monkeypatch.context() as patch:
      patch.setattr(jax, 'process_index', lambda index=index: index)
      patch.setattr(jax, 'process_count', lambda: 2)
      ckpt_lib.DataStateHandler().save(epath.Path(data_dir),
                                       ckpt_lib.DataStateSave(ckpt_lib.DataState(blob)))
  assert sorted(os.listdir(data_dir)) == ['process_0.bin', 'process_0.json',
                                          'process_1.bin', 'process_1.json']


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def _mapping_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and WARNING in r.getMessage()]


def test_data_seed_keeps_the_seed_of_a_stream_started_at_zero():
  assert ckpt_lib.data_seed(7, 0) == 7
  restarted = {ckpt_lib.data_seed(7, step) for step in (1, 2, 1000)} | {
      ckpt_lib.data_seed(8, 1)}
  assert len(restarted) == 4 and 7 not in restarted and 8 not in restarted
  assert ckpt_lib.data_seed(7, 2) == ckpt_lib.data_seed(7, 2)  # a pure function


def test_run_saved_by_two_processes_resumes_on_one(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  task = _ToyTask()
  monkeypatch.setattr(loop.tasks, 'get_task', lambda config: task)
  config = micro_config('', **{'train.checkpoint_every': 1, 'train.log_every': 1,
                               'train.num_visualize': 0, 'train.seed': SEED})
  workdir = str(tmp_path / 'run')
  seen: dict[int, np.ndarray] = {}

  def record(step, batch):
    assert step not in seen  # no step is trained twice
    seen[step] = batch['x']
    return batch

  assert loop.run(config, workdir, stop_after=2, batch_hook=record)['step'] == 2
  saved_kernel = ckpt_lib.load_params(workdir, 2)[1]['params']['kernel']
  # Step 1's update had warm-up lr 0: step 2's parameters are the first that moved.
  assert not np.array_equal(saved_kernel, ckpt_lib.load_params(workdir, 1)[1]['params']['kernel'])
  _rewrite_as_two_processes(os.path.join(workdir, 'checkpoints', '2', 'data'), monkeypatch)

  caplog.clear()
  assert loop.run(config, workdir, stop_after=3, batch_hook=record)['step'] == 3
  [warning] = _mapping_warnings(caplog)
  assert 'step 2' in warning and 'written by 2 processes and this run has 1' in warning
  assert 'Resumed from step 2' in caplog.text and 'falling back' not in caplog.text
  restart_seed = ckpt_lib.data_seed(SEED, 2)
  assert task.seeds == [SEED, restart_seed] and restart_seed != SEED
  assert sorted(seen) == [0, 1, 2]
  # The stream restarted under its own seed: step 2 is not a replay of step 0.
  np.testing.assert_array_equal(seen[2], next(_Stream(restart_seed))['x'])
  assert not np.array_equal(seen[2], seen[0])
  # Step 3's loss is that of step 2's saved parameters on step 2's batch: state restored.
  assert _losses(workdir)[3] == pytest.approx(_toy_loss(saved_kernel, seen[2]), rel=1e-5)

  # Resuming again with the same count continues the restarted stream exactly.
  caplog.clear()
  assert loop.run(config, workdir, batch_hook=record)['step'] == config.train.total_steps
  assert not _mapping_warnings(caplog) and 'Resumed from step 3' in caplog.text
  assert task.seeds == [SEED, restart_seed, restart_seed]
  stream = _Stream(restart_seed)
  next(stream)
  np.testing.assert_array_equal(seen[3], next(stream)['x'])


def _handler_restore(directory, process_index: int, process_count: int, monkeypatch):
  with monkeypatch.context() as patch:
    patch.setattr(jax, 'process_index', lambda: process_index)
    patch.setattr(jax, 'process_count', lambda: process_count)
    return ckpt_lib.DataStateHandler().restore(epath.Path(directory))


def test_data_state_of_another_process_count_or_older_format(tmp_path, monkeypatch):
  # Written before the JSON files: the blob count is the process count, streams start at 0.
  legacy = tmp_path / 'legacy'
  legacy.mkdir()
  (legacy / 'process_0.bin').write_bytes(b'position-0')
  assert _handler_restore(legacy, 0, 1, monkeypatch) == ckpt_lib.SavedDataState(
      ckpt_lib.DataState(b'position-0', 0), 1)
  (legacy / 'process_1.bin').write_bytes(b'position-1')
  assert _handler_restore(legacy, 0, 1, monkeypatch) == ckpt_lib.SavedDataState(None, 2)
  assert _handler_restore(legacy, 1, 2, monkeypatch) == ckpt_lib.SavedDataState(
      ckpt_lib.DataState(b'position-1', 0), 2)

  # Two processes wrote; process 1's files are lost: process 1 of 2 has none, process 0 has.
  current = tmp_path / 'current'
  for index in range(2):
    with monkeypatch.context() as patch:
      patch.setattr(jax, 'process_index', lambda index=index: index)
      patch.setattr(jax, 'process_count', lambda: 2)
      ckpt_lib.DataStateHandler().save(epath.Path(current), ckpt_lib.DataStateSave(
          ckpt_lib.DataState(f'position-{index}'.encode(), stream_start=5)))
  assert _handler_restore(current, 0, 4, monkeypatch) == ckpt_lib.SavedDataState(None, 2)
  (current / 'process_1.bin').unlink()
  (current / 'process_1.json').unlink()
  assert _handler_restore(current, 1, 2, monkeypatch) == ckpt_lib.SavedDataState(None, 2)
  assert _handler_restore(current, 0, 2, monkeypatch) == ckpt_lib.SavedDataState(
      ckpt_lib.DataState(b'position-0', 5), 2)

  # A damaged record is an error (restore_latest then falls back to an older step).
  (current / 'process_0.json').write_text('{"process_co')
  with pytest.raises(json.JSONDecodeError):
    _handler_restore(current, 0, 2, monkeypatch)
