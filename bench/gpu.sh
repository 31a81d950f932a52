#!/usr/bin/env bash
# The GPU benchmark on the device machine (one GPU): tables 1 and 2 of bench/gpu.py in bf16.
#   bash bench/gpu.sh            # full run, about 5-8 minutes; Markdown also in $OUT/gpu.md
#   bash bench/gpu.sh --smoke    # tiny sizes: a functional check, runs on CPU too
# Needs jax (CUDA), flax, optax, torch, transformers, scipy; not TensorFlow, ml_collections.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# XLA's GPU autotuning (level 4 by default: every convolution and GEMM algorithm timed and
# checked) was most of this run's time on an H200; level 0 takes XLA's default choices. An
# XLA_FLAGS already set (even empty) is left alone; an XLA that rejects the flag keeps its
# defaults.
if [ -z "${XLA_FLAGS+set}" ]; then
  fast=--xla_gpu_autotune_level=0
  if XLA_FLAGS=$fast "${PYTHON:-python3}" -c 'import jax; jax.numpy.zeros(1).block_until_ready()' \
      >/dev/null 2>&1; then
    export XLA_FLAGS=$fast
  else
    echo "This XLA rejects $fast: keeping its defaults." >&2
  fi
fi
out="${OUT:-/tmp}/gpu.md"
"${PYTHON:-python3}" bench/gpu.py --out "$out" "$@"
