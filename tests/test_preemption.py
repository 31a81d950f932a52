"""Real processes: `launch/train.py` stopped by SIGTERM resumes exactly; bad flags fail fast.

The subprocesses share the session's persistent compilation cache with the in-process
runs (tests/test_training_runs.py), so only the first compile of the session is paid.
"""

import logging
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from e2e_vlp.train import checkpoint as ckpt_lib
from e2e_vlp.train import loop
from test_training_runs import (TOTAL_STEPS, assert_trees_equal, cli_flags, compile_cache_dir,
                                config, persistent_compilation_cache, reference_run)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  with persistent_compilation_cache(compile_cache_dir(tmp_path_factory)):
    yield


def start_training(flags: list[str], log_path: str, cache: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
  with open(log_path, 'w') as log:
    return subprocess.Popen([sys.executable, os.path.join('launch', 'train.py'), *flags],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(pattern: str, log_path: str, process: subprocess.Popen, timeout: float) -> None:
  """Polls the log until `pattern` appears; fails if the process ends or time runs out."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    with open(log_path) as f:
      text = f.read()
    if re.search(pattern, text, re.MULTILINE):
      return
    if process.poll() is not None:
      pytest.fail(f'exited ({process.returncode}) before {pattern!r}:\n{text[-3000:]}')
    time.sleep(0.1)
  process.kill()
  pytest.fail(f'no {pattern!r} within {timeout}s')


def test_sigterm_stops_with_a_checkpoint_and_resumes_exactly(micro_cache, tmp_path_factory,
                                                             tmp_path, caplog):
  expected = ckpt_lib.load_params(reference_run(micro_cache, tmp_path_factory))[1]
  cfg = config(micro_cache, **{'train.log_every': 1})  # a progress line after every step
  workdir, log_path = str(tmp_path / 'run'), str(tmp_path / 'train.log')
  seed = random.randrange(1 << 30)
  signal_after = random.Random(seed).randint(1, TOTAL_STEPS - 2)
  context = f'(seed {seed}: SIGTERM after step {signal_after}; log {log_path})'

  process = start_training(cli_flags(cfg) + [f'--workdir={workdir}'], log_path,
                           compile_cache_dir(tmp_path_factory))
  wait_for(rf'step {signal_after}/{TOTAL_STEPS} ', log_path, process, timeout=900)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=300) == 0, context
  with open(log_path) as f:
    log = f.read()
  stopped = re.search(r'Stopped at step (\d+) on a preemption signal', log)
  assert stopped, f'no clean stop {context}:\n{log[-3000:]}'
  stopped = int(stopped.group(1))
  assert signal_after <= stopped <= signal_after + 1, context  # the step in flight finishes
  with open(os.path.join(workdir, 'config.json')) as f:  # the flags rebuilt the micro config
    assert f.read() == cfg.to_json_best_effort(indent=2)

  caplog.set_level(logging.INFO)
  assert loop.run(cfg, workdir)['step'] == TOTAL_STEPS
  assert f'Resumed from step {stopped} ' in caplog.text, context
  assert_trees_equal(ckpt_lib.load_params(workdir)[1], expected)


def test_unknown_config_field_on_the_command_line_fails_before_compiling(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, os.path.join('launch', 'train.py'), '--config.train.bach_size=3',
       f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  # One line that names the override and ml_collections' suggestion, not a traceback.
  assert 'unknown config field in --config.train.bach_size' in result.stderr
  assert 'Did you mean "batch_size"' in result.stderr
  assert 'Traceback' not in result.stderr
  assert 'compiled' not in result.stdout + result.stderr
  assert not workdir.exists()


class _Step:
  """A dispatched step's output that records when the loop waits for it."""

  def __init__(self, waited: list[int], index: int):
    self.waited, self.index = waited, index

  def block_until_ready(self):
    self.waited.append(self.index)
    return self


def test_steps_in_flight_waits_for_the_oldest_beyond_the_limit():
  waited = []
  in_flight = loop.StepsInFlight(2)
  for i in range(6):
    in_flight.push({'loss': _Step(waited, i)})
    # Steps 0 .. i - 2 are finished: at most two (i - 1 and i) remain queued.
    assert waited == list(range(max(0, i - 1))), i
