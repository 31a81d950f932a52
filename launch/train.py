r"""Trains E2E-VLP. With no arguments: pre-trains `tiny` on the embedded corpus.

  python launch/train.py
  python launch/train.py --config configs/pretrain.py:base --workdir /ckpt/run1
  python launch/train.py --config configs/vqa.py --config.init_from workdirs/pretrain_tiny
  python launch/train.py --config.optim.lr=3e-4 --config.train.total_steps=500

Re-running with the same workdir resumes from its newest checkpoint.
"""

import _bootstrap  # pylint: disable=g-bad-import-order

import logging as logging_lib
import os

from absl import app
from absl import flags
from absl import logging

from e2e_vlp.train import distributed
from e2e_vlp.train import loop

_bootstrap.define_config_flag(
    os.path.join(_bootstrap.ROOT, 'configs', 'pretrain.py'),
    'A config file, optionally with an argument: configs/pretrain.py:base.')
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs; default '
                    'workdirs/<task>_<variant>.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process).')


class _QuietLibraries(logging_lib.Filter):
  """Drops INFO chatter of orbax / tfds / TensorFlow; their warnings still show."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in _NOISY)
    return record.levelno >= logging_lib.WARNING or not noisy


_NOISY = ('/orbax/', '/tensorflow_datasets/', '/tensorflow/', '/etils/')


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  f = flags.FLAGS
  distributed.initialize_from_environment(f.coordinator_address, f.num_processes, f.process_id)
  loop.run(f.config, f.workdir)


if __name__ == '__main__':
  app.run(main)
