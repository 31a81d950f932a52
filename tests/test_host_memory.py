"""glibc malloc on transparent huge pages: the environment rule, and the launch scripts'
re-execution cutting the page faults of large allocations."""

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from e2e_vlp import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20

# A launch script: mallocs, touches and frees a 128 MiB block a few times on a worker
# thread, as XLA:CPU does with a step's buffers. Through libc directly: numpy asks for huge
# pages itself.
_CHURN = f"""
import _bootstrap
import ctypes, json, os, resource, threading

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def churn():
  for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(128 * {MIB})
    ctypes.memset(block, 1, 128 * {MIB})
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=churn)
thread.start()
thread.join()
print(json.dumps({{'tunables': os.environ.get('GLIBC_TUNABLES'), 'faults': faults}}))
"""


def test_environment_adds_the_tunable_and_keeps_others():
  env = host_memory.huge_page_environment({'A': '1'}, libc='glibc', mode='madvise')
  assert env == {'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  env = host_memory.huge_page_environment(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, libc='glibc', mode='always')
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}


@pytest.mark.parametrize('environ, libc, mode', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'glibc', 'madvise'),  # the user's opt-out
    ({'GLIBC_TUNABLES': 'x.y=1:glibc.malloc.hugetlb=1'}, 'glibc', 'madvise'),  # re-executed
    ({}, '', 'madvise'),  # not glibc (musl, macOS)
    ({}, 'glibc', 'never'),  # THP off: the tunable cannot help
    ({}, 'glibc', None),  # no THP in this kernel
])
def test_environment_is_left_alone(environ, libc, mode):
  assert host_memory.huge_page_environment(environ, libc=libc, mode=mode) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory.thp_mode(str(path)) == 'madvise'
  assert host_memory.thp_mode(str(tmp_path / 'missing')) is None


def _without_tunables() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}


def _churn(tmp_path, env: dict[str, str]) -> dict:
  """Runs _CHURN as a script next to a copy of launch/_bootstrap.py, as launch/ holds them."""
  launch = tmp_path / 'launch'
  launch.mkdir(exist_ok=True)
  shutil.copy(os.path.join(ROOT, 'launch', '_bootstrap.py'), launch)
  (launch / 'churn.py').write_text(_CHURN)
  result = subprocess.run([sys.executable, str(launch / 'churn.py')],
                          env={**env, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
                          timeout=120, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_a_launch_script_does_not_reexecute():
  """pytest (here) or a notebook imports launch scripts; only a script run as the program
  re-executes."""
  code = ('import os, sys; sys.path.insert(0, sys.argv[1]); import _bootstrap; '
          'print(os.environ.get("GLIBC_TUNABLES"))')
  result = subprocess.run([sys.executable, '-c', code, os.path.join(ROOT, 'launch')],
                          env=_without_tunables(),
                          capture_output=True, text=True, timeout=60, check=True)
  assert result.stdout.strip() == 'None'


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc' or host_memory.thp_mode() != 'madvise',
                    reason="needs glibc and the kernel's THP mode 'madvise'")
def test_launch_script_reexecutes_onto_huge_pages(tmp_path):
  base = _without_tunables()
  small_pages = 128 * MIB // os.sysconf('SC_PAGE_SIZE')
  on = _churn(tmp_path, base)
  off = _churn(tmp_path, {**base, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert on['tunables'] == 'glibc.malloc.hugetlb=1'
  assert off['tunables'] == 'glibc.malloc.hugetlb=0'
  # Every round maps the block afresh; with 4 KiB pages each page faults once.
  assert min(off['faults']) > 0.9 * small_pages, off
  assert max(on['faults'][1:]) < 0.1 * small_pages, on
