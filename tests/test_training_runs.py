"""Whole training runs: exact resume, checkpoint fallback, init_from, refused configs, NaNs,
bad data.

Every run trains the micro config (tests/micro.py) for the same 4 steps, so the compiled
step is shared. The loop jits a fresh step function per run, which jax's in-memory cache
does not recognise; a persistent compilation cache in the session's temp dir (also handed
to the subprocesses of tests/test_preemption.py) turns every compile after the first
into a load.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import threading
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import tensorflow as tf
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache

from configs import pretrain
from e2e_vlp import tasks
from e2e_vlp.train import checkpoint as ckpt_lib
from e2e_vlp.train import config_checks
from e2e_vlp.train import loop
from e2e_vlp.train import mesh as mesh_lib
from e2e_vlp.train import sharding
from e2e_vlp.train import state as state_lib
from micro import micro_config

TOTAL_STEPS = 4  # micro_config's; every run here must keep it (it is compiled into the step)
RUN_OVERRIDES = {'train.num_visualize': 0}  # no greedy-decoding compile in the final eval
Batch = dict[str, np.ndarray]


# ------------------------------------------------------------------------------ helpers
def config(cache_dir: str, **overrides):
  return micro_config(cache_dir, **{**RUN_OVERRIDES, **overrides})


def cli_flags(cfg) -> list[str]:
  """`--config.a.b=value` for every field where `cfg` differs from `pretrain.py:tiny`."""
  def flat(c):
    return traverse_util.flatten_dict(c.to_dict(), sep='.')
  default = flat(pretrain.get_config('tiny'))
  return [f'--config.{k}={v!r}' if isinstance(v, tuple) else f'--config.{k}={v}'
          for k, v in sorted(flat(cfg).items()) if default.get(k) != v]


@contextlib.contextmanager
def persistent_compilation_cache(path: str) -> Iterator[None]:
  """Compiled executables are written to and read from `path` while inside."""
  previous = jax.config.jax_compilation_cache_dir
  compilation_cache.set_cache_dir(path)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update('jax_compilation_cache_dir', previous)
    compilation_cache.reset_cache()


def compile_cache_dir(tmp_path_factory) -> str:
  """The session's persistent compilation cache, shared by every module and subprocess."""
  path = os.path.join(str(tmp_path_factory.getbasetemp()), 'jax_compilation_cache')
  os.makedirs(path, exist_ok=True)
  return path


def reference_run(cache_dir: str, tmp_path_factory) -> str:
  """The workdir of one uninterrupted micro run (made once per session, then reused)."""
  workdir = os.path.join(str(tmp_path_factory.getbasetemp()), 'micro_reference')
  done = os.path.join(workdir, 'DONE')
  if not os.path.exists(done):
    shutil.rmtree(workdir, ignore_errors=True)
    assert loop.run(config(cache_dir), workdir)['step'] == TOTAL_STEPS
    open(done, 'w').close()
  return workdir


def differing_leaves(actual: Any, expected: Any) -> list[str]:
  """Paths whose arrays are not bitwise equal (the trees must have the same paths)."""
  flat_actual = traverse_util.flatten_dict(actual, sep='/')
  flat_expected = traverse_util.flatten_dict(expected, sep='/')
  assert sorted(flat_actual) == sorted(flat_expected)
  return [k for k in sorted(flat_expected)
          if not np.array_equal(np.asarray(flat_actual[k]), np.asarray(flat_expected[k]))]


def assert_trees_equal(actual: Any, expected: Any):
  differing = differing_leaves(actual, expected)
  assert not differing, f'{len(differing)} leaves differ, e.g. {differing[:3]}'


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def poison_images(steps: set[int]) -> Callable[[int, Batch], Batch]:
  """A batch_hook that sets every pixel of the batches of `steps` (0-based) to NaN."""
  def hook(step: int, batch: Batch) -> Batch:
    if step in steps:
      batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    return batch
  return hook


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  with persistent_compilation_cache(compile_cache_dir(tmp_path_factory)):
    yield


@pytest.fixture(scope='module')
def reference(micro_cache, tmp_path_factory) -> tuple[str, dict[str, Any]]:
  workdir = reference_run(micro_cache, tmp_path_factory)
  step, tree = ckpt_lib.load_params(workdir)
  assert step == TOTAL_STEPS
  return workdir, tree


@pytest.fixture
def info_logs(caplog):
  caplog.set_level(logging.INFO)
  return caplog


# -------------------------------------------------------------------------------- tests
def test_stopped_and_resumed_run_matches_uninterrupted(micro_cache, reference, tmp_path,
                                                       info_logs):
  """With the session's cache set aside, both runs use the workdir's own
  (`config.train.compilation_cache_dir`): the resumed run loads the step that the first one
  compiled and stored, and trains exactly as the uninterrupted run did."""
  workdir = str(tmp_path / 'run')
  info_logs.set_level(logging.DEBUG, logger='jax._src.compiler')  # its cache hits
  with persistent_compilation_cache(None):
    first = loop.run(config(micro_cache), workdir, stop_after=2)
    assert first['step'] == 2 and checkpoint_steps(workdir) == [2]
    stored = os.listdir(os.path.join(workdir, 'compilation_cache'))
    assert any(name.startswith('jit_step-') for name in stored), stored
    info_logs.clear()
    second = loop.run(config(micro_cache), workdir)
    assert jax.config.jax_compilation_cache_dir is None  # the process's setting is back
  assert second['step'] == TOTAL_STEPS
  assert 'Resumed from step 2' in info_logs.text
  assert "Persistent compilation cache hit for 'jit_step'" in info_logs.text
  assert_trees_equal(ckpt_lib.load_params(workdir)[1], reference[1])


def test_step_compiles_while_the_state_is_initialised(micro_cache, tmp_path, monkeypatch):
  """The step compiles on the loop's worker thread while the main thread initialises the
  state: the initialisation waits for the compilation to begin, which code that compiled
  after it would never do (the wait would time out)."""
  compile_step, create_train_state = loop._compile_step, state_lib.create_train_state
  compiling, seen = threading.Event(), {}

  def compile_step_spy(*args):
    seen['compile_thread'] = threading.current_thread()
    compiling.set()
    return compile_step(*args)

  def create_train_state_spy(*args, **kwargs):
    seen['overlapped'] = compiling.wait(timeout=60)
    return create_train_state(*args, **kwargs)

  monkeypatch.setattr(loop, '_compile_step', compile_step_spy)
  monkeypatch.setattr(state_lib, 'create_train_state', create_train_state_spy)
  out = loop.run(config(micro_cache), str(tmp_path / 'run'), stop_after=1)
  assert out['step'] == 1
  assert seen['overlapped'] and seen['compile_thread'] is not threading.main_thread()


def test_truncated_newest_checkpoint_falls_back_to_previous(micro_cache, reference, tmp_path,
                                                           info_logs):
  workdir = str(tmp_path / 'run')
  shutil.copytree(os.path.join(reference[0], 'checkpoints'), os.path.join(workdir, 'checkpoints'))
  assert checkpoint_steps(workdir) == [2, 4]
  for folder, _, files in os.walk(os.path.join(workdir, 'checkpoints', '4', 'state')):
    if os.path.basename(folder) == 'd':  # a write cut short: array files lose their second half
      for name in files:
        os.truncate(os.path.join(folder, name), os.path.getsize(os.path.join(folder, name)) // 2)
  out = loop.run(config(micro_cache), workdir)
  assert 'Checkpoint at step 4' in info_logs.text and 'falling back' in info_logs.text
  assert 'Resumed from step 2' in info_logs.text
  assert out['step'] == TOTAL_STEPS
  # Steps 3 and 4 were trained again from step 2's state and data position.
  assert_trees_equal(ckpt_lib.load_params(workdir)[1], reference[1])


def test_init_from_pretraining_into_vqa_reports_new_head(micro_cache, reference, info_logs):
  cfg = config(micro_cache, task='vqa', **{'data.dataset': 'embedded_vqa',
                                           'model.num_answers': 32})
  task = tasks.get_task(cfg)
  mesh, rules = mesh_lib.make_mesh(cfg.mesh), sharding.logical_axis_rules(cfg.sharding)
  tx = optax.sgd(0.1)  # _init_from touches only params and constants
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = state_lib.state_shardings(task.init_variables, tx, mesh, rules)
    fresh = state_lib.create_train_state(task.init_variables, tx, jax.random.key(1), shardings)
  fresh_params = traverse_util.flatten_dict(jax.device_get(fresh.params), sep='/')
  state = loop._init_from(reference[0], fresh, shardings)  # pylint: disable=protected-access

  loaded = traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
  pretrained = traverse_util.flatten_dict(reference[1]['params'], sep='/')
  head = sorted(k for k in loaded if k.startswith('vqa_head/'))
  assert head and all(k in pretrained or k.startswith('vqa_head/') for k in loaded)
  for path, value in loaded.items():
    expected = fresh_params[path] if path.startswith('vqa_head/') else pretrained[path]
    np.testing.assert_array_equal(value, expected, err_msg=path)
  assert all(s.sharding == f for s, f in zip(jax.tree.leaves(state.params),
                                             jax.tree.leaves(shardings.params)))
  [record] = [r.getMessage() for r in info_logs.records if 'init_from' in r.getMessage()]
  assert f'newly initialised: {head}' in record
  assert f'{len(loaded) - len(head)} parameters loaded' in record
  unused = record.split('unused from the checkpoint:')[1]
  assert 'decoder' in unused  # the detection/caption decoders VQA does not use


@pytest.mark.parametrize('overrides, field', [
    ({'mesh.fsdp': 3}, 'config.mesh.fsdp'),  # 3 does not divide the 8 devices
    ({'train.batch_size': 12}, 'config.train.batch_size=12'),  # 12 rows over 8 devices
    ({'model.joint_visual': 'cells'}, 'config.model.joint_visual'),
    ({'train.max_steps_in_flight': 0}, 'config.train.max_steps_in_flight=0'),
    ({'train.cpu_ynn_fusion_types': 'individual_conv'}, 'config.train.cpu_ynn_fusion_types'),
    ({'train.checkpoint_replica_parallel_min_bytes': -1},
     'config.train.checkpoint_replica_parallel_min_bytes'),
])
def test_config_errors_stop_before_anything_is_built(micro_cache, tmp_path, overrides, field):
  workdir = str(tmp_path / 'run')
  with pytest.raises(config_checks.ConfigError, match=re.escape(field)):
    loop.run(config(micro_cache, **overrides), workdir)
  assert not os.path.exists(workdir)  # stopped before the workdir, the task or a compile


def test_checkpoint_of_another_model_shape_is_refused(micro_cache, reference, tmp_path,
                                                      info_logs):
  workdir = str(tmp_path / 'run')
  shutil.copytree(os.path.join(reference[0], 'checkpoints'), os.path.join(workdir, 'checkpoints'))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as error:
    loop.run(config(micro_cache, **{'model.mlp_dim': 48}), workdir)
  message = str(error.value)
  assert '\n' not in message
  assert 'params/' in message and 'saved (32, 64), config (32, 48)' in message
  assert 'compiled' not in info_logs.text
  assert checkpoint_steps(workdir) == [2, 4]


def test_single_nan_batch_is_skipped_with_parameters_unchanged(micro_cache, tmp_path):
  workdir = str(tmp_path / 'run')
  # The batch of step index 2 (the update that makes step 3) is all NaN.
  out = loop.run(config(micro_cache, **{'train.checkpoint_every': 1}), workdir,
                 batch_hook=poison_images({2}))
  assert out['step'] == TOTAL_STEPS
  before, after, later = (ckpt_lib.load_params(workdir, step)[1] for step in (2, 3, 4))
  assert_trees_equal(after, before)
  assert differing_leaves(later, after)  # training went on after the skipped update
  logged = {m['step']: m for m in read_metrics(workdir) if 'skipped_updates' in m}
  assert logged[2]['skipped_updates'] == 0 and logged[4]['skipped_updates'] == 1
  assert np.isfinite(logged[4]['loss'])


def test_repeated_nans_stop_the_run_without_a_bad_checkpoint(micro_cache, tmp_path):
  workdir = str(tmp_path / 'run')
  cfg = config(micro_cache, **{'train.max_consecutive_nonfinite': 2})
  with pytest.raises(loop.NonFiniteLossError) as error:
    loop.run(cfg, workdir, batch_hook=poison_images({2, 3}))
  message = str(error.value)
  assert 'at step 4' in message and 'loss' in message.split('non-finite terms:')[1]
  assert checkpoint_steps(workdir) == [2]
  saved = ckpt_lib.load_params(workdir)[1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))


def test_corrupt_records_in_a_shard_are_skipped_and_counted(micro_cache, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  source = os.path.join(micro_cache, 'tfds')
  [key] = os.listdir(source)
  shutil.copytree(os.path.join(source, key), data_dir)
  [shard] = tf.io.gfile.glob(os.path.join(data_dir, 'embedded', '*', '*train.tfrecord*'))
  records = [r.numpy() for r in tf.data.TFRecordDataset(shard)]
  corrupt = range(3, len(records), 8)
  for position in corrupt:
    example = tf.train.Example.FromString(records[position])
    example.features.feature['image'].bytes_list.value[0] = b'\x89PNG garbage'
    records[position] = example.SerializeToString()
  with tf.io.TFRecordWriter(shard) as writer:
    for record in records:
      writer.write(record)
  [vocab] = tf.io.gfile.glob(os.path.join(micro_cache, 'tokenizer', '*', 'vocab.txt'))
  workdir = str(tmp_path / 'run')
  out = loop.run(config(micro_cache, **{'data.data_dir': data_dir, 'data.tokenizer': vocab}),
                 workdir)
  assert out['step'] == TOTAL_STEPS
  logged = [m for m in read_metrics(workdir) if 'skipped_records' in m]
  assert [m['step'] for m in logged] == [2, 4]
  assert 0 < logged[-1]['skipped_records'] <= len(corrupt)
  assert all(np.isfinite(m['loss']) for m in logged)
