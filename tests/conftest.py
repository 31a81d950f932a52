"""Test session set-up: 8 virtual CPU devices (sharding tests), XLA's fastest compilation
(tests/fast_compile.py) and quiet TensorFlow.

The flags must be set before jax or tensorflow is imported anywhere, hence here.
Tests that use one device simply place their arrays on the default device.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/micro.py, fast_compile

import fast_compile  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault('XLA_FLAGS',
                      f'--xla_force_host_platform_device_count=8 {fast_compile.FLAGS}')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def micro_cache(tmp_path_factory) -> str:
  """A cache dir holding the micro embedded corpus, its TFDS build and vocabulary."""
  from e2e_vlp.data import builders  # pylint: disable=g-import-not-at-top
  from micro import MICRO_TRAIN_IMAGES, MICRO_VAL_IMAGES  # pylint: disable=g-import-not-at-top
  cache = str(tmp_path_factory.mktemp('e2e_vlp_cache'))
  builders.prepare_embedded(cache, num_train=MICRO_TRAIN_IMAGES, num_val=MICRO_VAL_IMAGES,
                            seed=0, image_size=96, vocab_size=512)
  return cache
