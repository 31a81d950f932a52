r"""Runs a hyper-parameter sweep of launch/train.py, or writes its commands for a cluster.

  python launch/sweep.py --config configs/pretrain.py:tiny \
      --sweep configs/sweeps/pretrain_lr.py --workdir workdirs/sweep1
  python launch/sweep.py ... --mode print   # writes workdirs/sweep1/commands.sh
  python launch/sweep.py ... --base_override train.total_steps=500
  python launch/sweep.py --summarize --workdir workdirs/sweep1

Every override is validated before the first run starts. Re-running the same command
skips finished runs and retries the others (each resumes from its newest checkpoint).
The summary of final metrics goes to <workdir>/summary.csv and summary.md.
"""

import _bootstrap  # pylint: disable=unused-import,g-bad-import-order

import sys

from absl import app
from absl import flags

from e2e_vlp import sweep

_CONFIG = flags.DEFINE_string('config', 'configs/pretrain.py',
                              'The base config, optionally with an argument: '
                              'configs/pretrain.py:tiny.')
_SWEEP = flags.DEFINE_string('sweep', None, 'A sweep file whose get_sweep() returns the '
                             'list of override dicts, e.g. configs/sweeps/pretrain_lr.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The sweep directory; run i trains in '
                               '<workdir>/<i>_<field=value...>.')
_MODE = flags.DEFINE_enum('mode', 'local', ['local', 'print'],
                          'local: run here, one after another; print: write '
                          '<workdir>/commands.sh, one command per run, for an array job.')
_BASE_OVERRIDE = flags.DEFINE_multi_string(
    'base_override', [], 'field=value applied to every run, e.g. train.total_steps=500 '
    '(repeatable).')
_SUMMARIZE = flags.DEFINE_bool('summarize', False, 'Only (re)write the summary of '
                               '--workdir from the runs found there.')
_PYTHON = flags.DEFINE_string('python', sys.executable, 'The interpreter in the commands '
                              '(the one a cluster node should use).')

flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    if _SUMMARIZE.value:
      summary = sweep.write_summary(_WORKDIR.value)
    else:
      if not _SWEEP.value:
        raise app.UsageError('--sweep is required (or --summarize).')
      summary = sweep.execute(_CONFIG.value, _SWEEP.value, _WORKDIR.value, mode=_MODE.value,
                              base_overrides=_BASE_OVERRIDE.value, python=_PYTHON.value)
  except sweep.SweepError as e:
    sys.exit(f'error: {e}')
  print(summary, end='')


if __name__ == '__main__':
  app.run(main)
