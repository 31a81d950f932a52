"""SIGTERM (the preemption notice of TPU VMs and SLURM) as a flag the loop polls.

The loop finishes the step it is in, saves a checkpoint, waits until it is durable and
returns; the next start resumes from it. With several processes every host must stop at
the same step, so the flags are OR-ed across processes (one tiny all-gather per step,
only when there is more than one process).
"""

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Context manager: installs the handlers on enter, restores the old ones on exit."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._event = threading.Event()
    self._previous = {}

  def __enter__(self) -> 'PreemptionWatcher':
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      logging.warning('Not in the main thread: SIGTERM will not trigger a clean stop.')
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    logging.warning('Received signal %d: stopping after this step with a checkpoint.', signum)
    self._event.set()

  def should_stop(self) -> bool:
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.array([local]))
    return bool(np.any(flags))
