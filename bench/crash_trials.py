"""Crash trials: SIGKILL a training run at random moments, restart it, check it ends exactly.

Each trial starts the micro pre-training run (tests/micro.py, a few seconds per step) as
`launch/train.py` in a fresh workdir, kills it with SIGKILL (no handler, no clean-up), and
restarts it until it finishes; the final parameters must equal, bit for bit, those of an
uninterrupted run of the same config measured first. Kill moments alternate between
- `during save`: the instant an asynchronous checkpoint's `*.orbax-checkpoint-tmp*`
  directory appears (a randomly chosen save of the run), and
- `random`: a random moment of training: after a random step k (0 = just compiled), a
  uniform fraction of the time the uninterrupted run took from step k to step k + 1.

One line per trial: when it was killed, what was on disk (complete steps, temporary
directories), the step each restart resumed from, and whether the result is identical.
All runs share a persistent compilation cache, so only the reference run compiles. The
checkout is shared with other engineers: the script fingerprints the Python sources before
and after and says so when they changed mid-way (the results are then not comparable).

Usage: python bench/crash_trials.py [--trials 5] [--kills 1] [--steps 8] [--seed 0]
"""

import argparse
import dataclasses
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))  # tests/micro.py: the micro config
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from flax import traverse_util  # noqa: E402

from configs import pretrain  # noqa: E402
from e2e_vlp.data import builders  # noqa: E402
from e2e_vlp.train import checkpoint as ckpt_lib  # noqa: E402
from micro import MICRO_TRAIN_IMAGES, MICRO_VAL_IMAGES, micro_config  # noqa: E402

TMP_MARKER = '.orbax-checkpoint-tmp'


@dataclasses.dataclass
class Attempt:
  kill: str  # how and when it was killed, or 'finished'
  on_disk: str  # checkpoint directory after the process ended
  resumed_from: int | None  # step it restored, None for a fresh start
  returncode: int


def cli_flags(cfg) -> list[str]:
  """`--config.a.b=value` for every field where `cfg` differs from `pretrain.py:tiny`."""
  def flat(c):
    return traverse_util.flatten_dict(c.to_dict(), sep='.')
  default = flat(pretrain.get_config('tiny'))
  return [f'--config.{k}={v!r}' if isinstance(v, tuple) else f'--config.{k}={v}'
          for k, v in sorted(flat(cfg).items()) if default.get(k) != v]


def disk_state(workdir: str) -> str:
  directory = os.path.join(workdir, 'checkpoints')
  names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  steps = sorted(int(n) for n in names if n.isdigit())
  tmp = [n for n in names if TMP_MARKER in n]
  return f'steps {steps}' + (f' + tmp {tmp}' if tmp else '')


def read(path: str) -> str:
  with open(path) as f:
    return f.read()


class Runner:
  """Starts `launch/train.py` with the trial config; every run logs into its own file."""

  def __init__(self, flags: list[str], env: dict[str, str], logs: str):
    self.flags, self.env, self.logs = flags, env, logs
    self.count = 0

  def start(self, workdir: str) -> tuple[subprocess.Popen, str]:
    self.count += 1
    log_path = os.path.join(self.logs, f'run_{self.count:03d}.log')
    with open(log_path, 'w') as log:
      process = subprocess.Popen(
          [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), *self.flags,
           f'--workdir={workdir}'], cwd=ROOT, env=self.env, stdout=log,
          stderr=subprocess.STDOUT)
    return process, log_path


def sources_fingerprint() -> str:
  digest = hashlib.sha256()
  for folder in ('e2e_vlp', 'configs', 'launch'):
    for parent, _, files in sorted(os.walk(os.path.join(ROOT, folder))):
      for name in sorted(f for f in files if f.endswith('.py')):
        with open(os.path.join(parent, name), 'rb') as f:
          digest.update(name.encode() + f.read())
  return digest.hexdigest()[:12]


def progress_pattern(k: int, total: int) -> str:
  return 'Step compiled' if k == 0 else f'step {k}/{total} '


def wait_for(pattern: str, process: subprocess.Popen, log_path: str,
             poll: float = 0.02) -> float | None:
  """Blocks until `pattern` is in the log; the time it appeared, or None if the run ended."""
  while process.poll() is None:
    if pattern in read(log_path):
      return time.time()
    time.sleep(poll)
  return None


def step_times(process: subprocess.Popen, log_path: str, total: int) -> list[float]:
  """When 'Step compiled' (index 0) and each progress line 'step k/total' appeared."""
  times = []
  for k in range(total + 1):
    seen = wait_for(progress_pattern(k, total), process, log_path)
    if seen is None:
      raise RuntimeError(f'The uninterrupted run ended early; see {log_path}.')
    times.append(seen)
  return times


def kill_during_save(process: subprocess.Popen, workdir: str, nth: int) -> str:
  """SIGKILLs the moment the nth temporary checkpoint directory of this run appears."""
  directory = os.path.join(workdir, 'checkpoints')
  seen: list[str] = []
  while process.poll() is None:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    for name in names:
      if TMP_MARKER in name and name not in seen:
        seen.append(name)
    if len(seen) >= nth:
      process.send_signal(signal.SIGKILL)
      return f'during save (saw {seen[-1]})'
    time.sleep(0.002)
  return f'finished before save #{nth}'


def kill_at_random(process: subprocess.Popen, log_path: str, gaps: list[float],
                   rng: random.Random) -> str:
  """SIGKILLs a random fraction of the reference's step time after a random step."""
  k = rng.randrange(len(gaps))
  delay = rng.uniform(0.0, gaps[k])
  seen = wait_for(progress_pattern(k, len(gaps)), process, log_path)
  while seen is not None and process.poll() is None and time.time() < seen + delay:
    time.sleep(0.005)
  if process.poll() is not None:
    return f'finished before step {k} + {delay:.2f}s'
  process.send_signal(signal.SIGKILL)
  return f'random, {delay:.2f}s after ' + ('compiling' if k == 0 else f'step {k}')


def resumed_from(log_path: str) -> int | None:
  found = re.search(r'Resumed from step (\d+)', read(log_path))
  return int(found.group(1)) if found else None


def run_trial(runner: Runner, workdir: str, save: int | None, kills: int, gaps: list[float],
              rng: random.Random) -> list[Attempt]:
  """Kills `kills` runs (during save number `save`, or at random when None), then finishes."""
  attempts = []
  for _ in range(kills):
    process, log_path = runner.start(workdir)
    if save is not None:
      how = kill_during_save(process, workdir, save)
    else:
      how = kill_at_random(process, log_path, gaps, rng)
    code = process.wait()
    attempts.append(Attempt(how, disk_state(workdir), resumed_from(log_path), code))
  for _ in range(3):  # restart until it finishes (a real failure shows as a non-zero code)
    process, log_path = runner.start(workdir)
    code = process.wait()
    attempts.append(Attempt('finished' if code == 0 else f'exit {code}', disk_state(workdir),
                            resumed_from(log_path), code))
    if code == 0:
      break
    print(f'    restart failed ({code}); log tail:\n{read(log_path)[-2000:]}', flush=True)
  return attempts


def compare(workdir: str, expected: dict) -> str:
  try:
    step, actual = ckpt_lib.load_params(workdir)
  except (FileNotFoundError, ValueError) as e:
    return f'no (unreadable: {e})'
  a = traverse_util.flatten_dict(actual, sep='/')
  b = traverse_util.flatten_dict(expected, sep='/')
  if a.keys() != b.keys():
    return 'no (different parameter names)'
  differing = [k for k in b if not np.array_equal(a[k], b[k])]
  if not differing:
    return f'yes (step {step})'
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in differing)
  return f'no ({len(differing)} leaves differ, max |diff| {worst:.3g}, step {step})'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--trials', type=int, default=5)
  parser.add_argument('--kills', type=int, default=1, help='SIGKILLs per trial')
  parser.add_argument('--steps', type=int, default=8, help='train.total_steps')
  parser.add_argument('--checkpoint_every', type=int, default=2)
  parser.add_argument('--devices', type=int, default=8, help='virtual CPU devices per run')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='', help='default: a new temporary directory')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  logging.set_verbosity(logging.ERROR)  # orbax's read-only notices when loading params

  root = args.workdir or tempfile.mkdtemp(prefix='crash_trials_')
  cache = os.path.join(root, 'cache')
  builders.prepare_embedded(cache, num_train=MICRO_TRAIN_IMAGES, num_val=MICRO_VAL_IMAGES,
                            seed=0, image_size=96, vocab_size=512)
  cfg = micro_config(cache, **{
      'train.total_steps': args.steps, 'train.checkpoint_every': args.checkpoint_every,
      'train.log_every': 1, 'train.eval_every': args.steps, 'train.num_visualize': 0})
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(root, 'jax_cache'),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={args.devices}')
  logs = os.path.join(root, 'logs')
  os.makedirs(logs, exist_ok=True)
  runner = Runner(cli_flags(cfg), env, logs)
  saves = -(-args.steps // args.checkpoint_every)

  fingerprint = sources_fingerprint()
  reference = os.path.join(root, 'reference')
  start = time.time()
  process, log_path = runner.start(reference)
  times = step_times(process, log_path, args.steps)
  if process.wait() != 0:
    sys.exit(f'The uninterrupted run failed; see {log_path}.')
  gaps = list(np.diff(times))
  expected = ckpt_lib.load_params(reference)[1]
  print(f'uninterrupted run: {time.time() - start:.0f}s, training {times[-1] - times[0]:.1f}s '
        f'after compiling; {args.steps} steps, a checkpoint every {args.checkpoint_every}; '
        f'files in {root}', flush=True)

  results = []
  first_save = rng.randrange(saves)  # kills during save rotate over the run's saves
  for trial in range(args.trials):
    save = (first_save + trial // 2) % saves + 1 if trial % 2 == 0 else None
    workdir = os.path.join(root, f'trial_{trial}')
    attempts = run_trial(runner, workdir, save, args.kills, gaps, rng)
    identical = compare(workdir, expected)
    results.append((attempts, identical))
    kills = '; '.join(f'kill: {a.kill} -> on disk: {a.on_disk}' for a in attempts[:-1])
    resumed = ', '.join('fresh' if a.resumed_from is None else str(a.resumed_from)
                        for a in attempts)
    print(f'trial {trial}: {kills} | runs resumed from: {resumed} | final: '
          f'{attempts[-1].kill} | identical: {identical}', flush=True)

  same = sum(identical.startswith('yes') for _, identical in results)
  during_save = sum(a.kill.startswith('during save') for attempts, _ in results
                    for a in attempts)
  print(f'summary: {same}/{len(results)} trials identical to the uninterrupted run; '
        f'{during_save} kills during an asynchronous save; {runner.count} processes started '
        f'in {time.time() - start:.0f}s.', flush=True)
  if sources_fingerprint() != fingerprint:
    print('WARNING: the Python sources changed during the trials; rerun for comparable '
          'results.', flush=True)
  sys.exit(0 if same == len(results) else 1)


if __name__ == '__main__':
  main()
