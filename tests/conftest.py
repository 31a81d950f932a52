"""Test session set-up: 8 virtual CPU devices (sharding tests) and quiet TensorFlow.

The flags must be set before jax or tensorflow is imported anywhere, hence here.
Tests that use one device simply place their arrays on the default device.
"""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
