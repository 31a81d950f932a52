"""Host memory: glibc's malloc on transparent huge pages, set before the process starts.

XLA:CPU allocates a step's buffers afresh at every step (`tsl::port::AlignedMalloc`, on a
worker thread). glibc serves a block larger than a thread heap (64 MiB) with its own mmap
and unmaps it when freed, so the kernel faults in and zeroes fresh 4 KiB pages every step:
about 243k minor faults per DETR training step at the r50 shape (about 1 GB). With the
tunable `glibc.malloc.hugetlb=1`, malloc marks its mappings for transparent huge pages
(the kernel's default THP mode, 'madvise', honours only marked ones), and the same step
takes 1-4k faults. Measured figures are in the README ("Benchmarks"). One arena with mmap
and trimming off (`arena_max=1:mmap_max=0:trim_threshold=<4 GiB or more>`) reuses the
buffers instead (no faults at all) and stepped ~5% faster at `base`, but every thread then
takes one lock, and the `tiny` default run was 11% slower; so huge pages.

glibc reads its tunables once, when the program starts, so a launch script run as the
program re-executes itself with the tunable added (`launch/_bootstrap.py` calls
`reexec_with_huge_pages` first thing, before any heavy import). The benchmarks do not: with
PyTorch's step interleaved in the same process, ours got slower on huge pages (README). A
`GLIBC_TUNABLES` that already names the tunable is left alone:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns this off.
"""

import os
import platform
import sys
from typing import Mapping

ENV = 'GLIBC_TUNABLES'
TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def thp_mode(path: str = THP_MODE) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'); None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def huge_page_environment(environ: Mapping[str, str], *, libc: str, mode: str | None
                          ) -> dict[str, str] | None:
  """`environ` with `TUNABLE=1` added to `GLIBC_TUNABLES`, or None where it would not help
  or was chosen already: libc not glibc, THP off or unknown, or the tunable named.

  `libc`: `platform.libc_ver()[0]`; `mode`: `thp_mode()`.
  """
  if libc != 'glibc' or mode not in ('always', 'madvise'):
    return None
  tunables = environ.get(ENV, '')
  if any(item.split('=')[0] == TUNABLE for item in tunables.split(':')):
    return None
  return {**environ, ENV: f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'}


def reexec_with_huge_pages() -> None:
  """Re-executes this Python process (same interpreter, options and arguments, same pid)
  with `huge_page_environment`; returns where that is None or the interpreter is unknown.

  Call it before importing jax or TensorFlow: everything done before it runs twice.
  """
  if not sys.platform.startswith('linux') or not sys.executable:
    return
  env = huge_page_environment(os.environ, libc=platform.libc_ver()[0], mode=thp_mode())
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
