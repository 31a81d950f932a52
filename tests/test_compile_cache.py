"""The run's persistent compilation cache (e2e_vlp/train/compile_cache.py): programs are
stored and loaded, an entry cut short is replaced, the process's own directory wins, and
the process's setting is back after the run."""

import json
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from e2e_vlp.train import compile_cache
from test_training_runs import persistent_compilation_cache


@pytest.fixture(autouse=True)
def cache_everything():
  """jax stores only programs that took over 1 s to compile; these take milliseconds."""
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  try:
    yield
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', previous)


@pytest.fixture
def no_process_cache():
  """The process starts without a cache directory (another module may have set one)."""
  with persistent_compilation_cache(None):
    yield


@pytest.fixture
def compiler_logs(caplog):
  caplog.set_level(logging.DEBUG, logger='jax._src.compiler')
  return caplog


def compile_program(scale: float = 3.0):
  """A fresh jit each call (jax's in-memory cache does not know it), the same program."""
  x = np.arange(12.0, dtype=np.float32).reshape(3, 4)  # numpy: no eager op is compiled
  return jax.jit(lambda a: jnp.tanh(a * scale).sum(0)).lower(x).compile(), x


def entries(directory) -> list[str]:
  return sorted(name for name in os.listdir(directory) if name.endswith('-cache'))


def test_resolve_places_relative_paths_in_the_workdir():
  assert compile_cache.resolve('compilation_cache', '/runs/a') == '/runs/a/compilation_cache'
  assert compile_cache.resolve('/shared/xla', '/runs/a') == '/shared/xla'
  assert compile_cache.resolve('~/xla', '/runs/a') == os.path.expanduser('~/xla')
  assert compile_cache.resolve('gs://bucket/xla', '/runs/a') == 'gs://bucket/xla'
  assert compile_cache.resolve('', '/runs/a') == ''


def test_a_program_is_stored_then_loaded_by_the_next_run(no_process_cache, tmp_path,
                                                         compiler_logs):
  directory = str(tmp_path / 'cache')
  with compile_cache.persistent(directory) as in_use:
    assert in_use == directory
    compiled, x = compile_program()
    expected = np.asarray(compiled(x))
  assert len(entries(directory)) == 1
  assert 'Persistent compilation cache hit' not in compiler_logs.text

  with compile_cache.persistent(directory):  # a new run: jax's cache re-initialised
    loaded, _ = compile_program()
  assert 'Persistent compilation cache hit' in compiler_logs.text
  np.testing.assert_array_equal(np.asarray(loaded(x)), expected)


def test_an_entry_cut_short_is_deleted_and_stored_whole_again(no_process_cache, tmp_path,
                                                              compiler_logs):
  directory = str(tmp_path / 'cache')
  with compile_cache.persistent(directory):
    compile_program()
  [name] = entries(directory)
  path = os.path.join(directory, name)
  os.truncate(path, os.path.getsize(path) // 2)  # a kill while jax wrote it

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    with compile_cache.persistent(directory):
      assert entries(directory) == []  # deleted before anything compiled
      compile_program()
    with compile_cache.persistent(directory):
      compile_program()
  assert f'Deleted 1 unreadable compilation cache entries in {directory}' in compiler_logs.text
  assert entries(directory) == [name]
  assert compile_cache.drop_unreadable_entries(directory) == []  # stored whole
  assert compiler_logs.text.count('Persistent compilation cache hit') == 1
  # jax's own read of a cut entry warns and leaves it in place; here it never saw one.
  assert not [w for w in caught if 'Error reading persistent compilation cache' in str(w.message)]


def test_an_entry_is_read_once(no_process_cache, tmp_path, monkeypatch):
  """Checked entries are listed beside them and not read again: a cache shared by many
  runs costs each start only its new entries."""
  directory = str(tmp_path / 'cache')
  with compile_cache.persistent(directory):
    compile_program(scale=2.0)
  assert compile_cache.drop_unreadable_entries(directory) == []
  with open(os.path.join(directory, compile_cache.VERIFIED)) as f:
    assert json.load(f) == entries(directory)

  reads = []
  decompress = compile_cache.jax_cache_format.decompress_executable
  monkeypatch.setattr(compile_cache.jax_cache_format, 'decompress_executable',
                      lambda blob: reads.append(len(blob)) or decompress(blob))
  assert compile_cache.drop_unreadable_entries(directory) == [] and reads == []
  with compile_cache.persistent(directory):
    compile_program(scale=4.0)  # a new entry: read at the next start, and only it
  assert compile_cache.drop_unreadable_entries(directory) == [] and len(reads) == 1
  assert compile_cache.drop_unreadable_entries(directory) == [] and len(reads) == 1
  with open(os.path.join(directory, compile_cache.VERIFIED), 'w') as f:
    f.write('{"cut short')  # an unreadable list: every entry is checked again
  assert compile_cache.drop_unreadable_entries(directory) == [] and len(reads) == 3
  with open(os.path.join(directory, compile_cache.VERIFIED)) as f:
    assert json.load(f) == entries(directory)


def test_a_cache_that_cannot_be_written_is_still_read(no_process_cache, tmp_path, monkeypatch,
                                                     compiler_logs):
  """A read-only cache (another user's run, a read-only mount): the check cannot record
  anything, the run goes on and loads the entries."""
  directory = str(tmp_path / 'cache')
  with compile_cache.persistent(directory):
    compile_program(scale=6.0)

  def read_only(self, *args, **kwargs):
    raise PermissionError(f'[Errno 30] Read-only file system: {self}')

  monkeypatch.setattr(compile_cache.epath.Path, 'write_text', read_only)
  with compile_cache.persistent(directory):
    compile_program(scale=6.0)
  assert 'they are used unchecked' in compiler_logs.text
  assert 'Persistent compilation cache hit' in compiler_logs.text


def test_jax_alone_keeps_an_entry_cut_short(no_process_cache, tmp_path):
  """Why `persistent` checks the entries: jax reads a cut entry as an error every time and
  never replaces it (its cache skips keys that exist)."""
  directory = str(tmp_path / 'cache')
  with compile_cache.persistent(directory):
    compile_program()
  [name] = entries(directory)
  path = os.path.join(directory, name)
  os.truncate(path, os.path.getsize(path) // 2)
  cut = os.path.getsize(path)
  jax_cache.set_cache_dir(directory)
  jax_cache.reset_cache()
  with pytest.warns(UserWarning, match='Error reading persistent compilation cache'):
    compile_program()
  assert os.path.getsize(path) == cut


def test_the_process_cache_directory_wins(no_process_cache, tmp_path):
  own, configured = str(tmp_path / 'process'), str(tmp_path / 'configured')
  jax_cache.set_cache_dir(own)
  jax_cache.reset_cache()
  with compile_cache.persistent(configured) as in_use:
    assert in_use == own
    compile_program(scale=5.0)
  assert len(entries(own)) == 1 and not os.path.exists(configured)
  assert jax.config.jax_compilation_cache_dir == own


def test_the_process_setting_is_back_after_the_run(no_process_cache, tmp_path):
  directory = str(tmp_path / 'cache')
  with compile_cache.persistent(directory):
    compile_program(scale=7.0)
  assert jax.config.jax_compilation_cache_dir is None
  compile_program(scale=11.0)  # after the run: compiled, not stored
  assert len(entries(directory)) == 1


def test_an_empty_setting_turns_the_cache_off(no_process_cache, tmp_path):
  with compile_cache.persistent('') as in_use:
    assert in_use == ''
    assert jax.config.jax_compilation_cache_dir is None
