"""The run's persistent compilation cache: compiled programs outlive the process.

A run restarted after a kill or a preemption, or `launch/eval.py` on its workdir, loads
the train step, the state's initialisation and the evaluation from disk instead of
compiling them again (jax's persistent compilation cache; README, "Restarts load their
programs").

jax reads its cache directory once per process, before the first compilation it caches:
`persistent` sets it, re-initialises jax's cache and puts the process's setting back on
exit, so a run leaves no global state behind. A directory the process already has
(JAX_COMPILATION_CACHE_DIR, or a caller's `jax.config`) wins over the config's.

Anyone who can write to a cache directory can run code in the processes that read it
(jax's warning): keep it where only you write, as the workdir is.
"""

import contextlib
import json
import os
from typing import Iterator

import jax
from absl import logging
from etils import epath
# Entries are stored compressed; jax's own codec (zstd when installed, else zlib) reads them.
from jax._src import compilation_cache as jax_cache_format
from jax.experimental.compilation_cache import compilation_cache as jax_cache

_ENTRY_SUFFIX = '-cache'  # jax's LRUCache: <key>-cache, with <key>-atime when size-capped
_ATIME_SUFFIX = '-atime'
# Entries that decompressed once (names, JSON), kept beside them.
VERIFIED = 'e2e_vlp_verified_entries.json'


def resolve(setting: str, workdir: str) -> str:
  """`config.train.compilation_cache_dir` -> the directory to use ('' stays off).

  A relative path is taken inside the workdir; absolute, `~` and URL (gs://...) paths as
  given.
  """
  if not setting:
    return ''
  if '://' in setting:
    return setting
  setting = os.path.expanduser(setting)
  return setting if os.path.isabs(setting) else os.path.join(workdir, setting)


def drop_unreadable_entries(directory: str) -> list[str]:
  """Deletes the entries under `directory` that do not decompress; returns their names.

  jax writes an entry in place and never replaces one that exists, so an entry cut short by
  a kill mid-write would fail to load (a warning) and its program would compile on every
  start from then on. Deleted, the next compilation stores it whole again. Entries that
  decompressed once are listed in `VERIFIED` and not read again (jax never rewrites them),
  so a cache shared by many runs costs each start only its new entries. (An entry that
  another run is still writing looks cut short too: deleted, it is stored again later.)
  """
  path = epath.Path(directory)
  if not path.exists():
    return []
  index = path / VERIFIED
  try:
    verified = set(json.loads(index.read_text()))
  except (FileNotFoundError, ValueError, TypeError):  # none yet, or unreadable: check all
    verified = set()
  present, dropped = set(), []
  for entry in sorted(path.glob(f'*{_ENTRY_SUFFIX}')):
    if entry.name in verified:
      present.add(entry.name)
      continue
    try:
      jax_cache_format.decompress_executable(entry.read_bytes())
      present.add(entry.name)
    except Exception:  # pylint: disable=broad-except  (zlib.error, zstd's ZstdError, ...)
      key = entry.name[:-len(_ENTRY_SUFFIX)]
      entry.unlink(missing_ok=True)
      (path / f'{key}{_ATIME_SUFFIX}').unlink(missing_ok=True)
      dropped.append(entry.name)
  if present != verified:
    staged = path / f'{VERIFIED}.{os.getpid()}.tmp'
    staged.write_text(json.dumps(sorted(present)))
    staged.replace(index)  # whole or not at all, as the entries should be
  return dropped


@contextlib.contextmanager
def persistent(directory: str) -> Iterator[str]:
  """Compiled programs are read from and written to `directory` while inside; yields the
  directory in use ('' when none).

  Does nothing when `directory` is '' or the process already has a cache directory (that
  one stays in use). Process 0, the one jax lets write entries, first deletes the entries
  that do not decompress (`drop_unreadable_entries`).
  """
  current = jax.config.jax_compilation_cache_dir
  if current or not directory:
    yield current or ''
    return
  if jax.process_index() == 0:
    try:
      dropped = drop_unreadable_entries(directory)
    except OSError as error:  # e.g. a read-only cache: jax still reads it (and warns on writes)
      logging.warning('Could not check the compilation cache entries in %s (%s); they are '
                      'used unchecked.', directory, error)
      dropped = []
    if dropped:
      logging.warning('Deleted %d unreadable compilation cache entries in %s (a write cut '
                      'short?); their programs compile again: %s', len(dropped), directory,
                      ', '.join(dropped))
  jax_cache.set_cache_dir(directory)
  jax_cache.reset_cache()
  try:
    yield directory
  finally:
    jax.config.update('jax_compilation_cache_dir', None)
    jax_cache.reset_cache()
