"""Two processes on localhost train exactly like one process with the same 4 devices.

Launches tests/multihost_worker.py as two `jax.distributed` processes (2 CPU devices each,
gloo collectives, one shared workdir) and, concurrently, as one 4-device process fed the
concatenation of the batches the pipeline yields for `process_index=0, 1` of 2. The final
parameters agree only if each real host read its own share of the data and the loop
assembled global arrays from the host-local batches. Both runs end with one evaluation
whose padded last batch (8 images per host, host batches of 6) must not stall either host.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from e2e_vlp.train import checkpoint as ckpt_lib

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')
TIMEOUT_S = 900  # the three processes compile concurrently on a small, shared machine
LOG_TAIL = 6000


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(name: str, args: list[str], log_dir) -> tuple[str, subprocess.Popen, str]:
  log = str(log_dir / f'{name}.log')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', TF_ENABLE_ONEDNN_OPTS='0')
  with open(log, 'w') as f:
    proc = subprocess.Popen([sys.executable, WORKER, *args], stdout=f, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
  return name, proc, log


def _run_all(launched: list[tuple[str, subprocess.Popen, str]]) -> None:
  """Waits for every process; on a failure or the timeout kills the rest and shows logs."""
  deadline = time.time() + TIMEOUT_S
  failed = None
  try:
    pending = list(launched)
    while pending and failed is None:
      for item in list(pending):
        rc = item[1].poll()
        if rc is not None:
          pending.remove(item)
          if rc:
            failed = f'{item[0]} exited with status {rc}'
      if time.time() > deadline:
        failed = f'timed out after {TIMEOUT_S}s waiting for {[n for n, _, _ in pending]}'
      time.sleep(0.5)
  finally:
    for _, proc, _ in launched:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  if failed:
    logs = '\n'.join(f'----- {name} (last {LOG_TAIL} chars) -----\n' + open(log).read()[-LOG_TAIL:]
                     for name, _, log in launched)
    pytest.fail(f'{failed}\n{logs}')


@pytest.fixture(scope='module')
def runs(micro_cache, tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  shared, reference = root / 'two_processes', root / 'one_process'
  coordinator = f'127.0.0.1:{_free_port()}'
  common = ['--cache', micro_cache]
  _run_all([_launch(f'process_{i}', common + [
      '--workdir', str(shared), '--local_devices', '2', '--coordinator', coordinator,
      '--num_processes', '2', '--process_id', str(i)], root) for i in range(2)] + [
          _launch('reference', common + ['--workdir', str(reference), '--local_devices', '4',
                                         '--emulate_hosts', '2'], root)])
  load = lambda path: json.loads(path.read_text())
  return (shared, [load(shared / f'result_{i}.json') for i in range(2)],
          reference, load(reference / 'result_0.json'))


def test_two_processes_match_one_process(runs):
  shared, hosts, reference, ref = runs
  assert [(h['process_index'], h['process_count'], h['device_count']) for h in hosts] == [
      (0, 2, 4), (1, 2, 4)]
  assert (ref['process_count'], ref['device_count']) == (1, 4)
  # Each host read its own share: disjoint images, 6 rows per step (global batch 12 / 2).
  ids = [h['image_ids'] for h in hosts]
  assert all(len(step) == 6 for host in ids for step in host)
  assert not set(sum(ids[0], [])) & set(sum(ids[1], []))
  # The reference trained on exactly the two hosts' global batches.
  assert ref['image_ids'] == [a + b for a, b in zip(*ids)]

  step, params = ckpt_lib.load_params(str(shared))
  ref_step, ref_params = ckpt_lib.load_params(str(reference))
  assert step == ref_step == 2
  assert hosts[0]['last']['grad_norm'] > 0  # the updates moved the weights
  np.testing.assert_allclose(hosts[0]['last']['loss'], ref['last']['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               params, ref_params)


def test_process_zero_writes_metrics_and_hosts_agree_on_eval(runs):
  shared, hosts, _, ref = runs
  lines = [json.loads(line) for line in (shared / 'metrics.jsonl').read_text().splitlines()]
  kinds = [(line['step'], any(k.startswith('eval/') for k in line)) for line in lines]
  assert kinds == [(1, False), (2, False), (2, True)]  # once each, not once per process
  assert (shared / 'config.json').exists()
  data = shared / 'checkpoints' / '2' / 'data'
  assert sorted(f for f in os.listdir(data) if f.endswith('.bin')) == [
      'process_0.bin', 'process_1.bin']
  # Process 0 stored the compiled step in the shared workdir's cache, for a restart to load.
  assert any(f.startswith('jit_step-') for f in os.listdir(shared / 'compilation_cache'))
  # Both hosts ran the (padded) evaluation to the end and agree on its global metrics.
  evals = [{k: v for k, v in h['last'].items() if k.startswith('eval/')} for h in hosts]
  assert evals[0] and evals[0] == evals[1]
  assert all(np.isfinite(v) for v in evals[0].values())
  # Caption targets are not random: the same 16 images minus the padding, scored by the same
  # weights, give the single process' accuracy (MLM/ITM draws differ per host, so they may not).
  np.testing.assert_allclose(evals[0]['eval/caption_token_accuracy'],
                             ref['last']['eval/caption_token_accuracy'], rtol=1e-6)
