#!/usr/bin/env bash
# The GPU benchmark on the device machine (one GPU): tables 1 and 2 of bench/gpu.py in bf16.
#   bash bench/gpu.sh            # full run, over 8 minutes on an H200 (mostly compilation);
#                                # Markdown also in $OUT/gpu.md
#   bash bench/gpu.sh --sections pretrain --pretrain base   # one table, one row
#   bash bench/gpu.sh --smoke    # tiny sizes: a functional check, runs on CPU too
# Needs jax (CUDA), flax, optax, torch, transformers, scipy; not TensorFlow, ml_collections.
# Progress goes to stderr as it happens ("[  312.4 s] step compiled in ..."): a run cut off
# by the machine's time limit still shows whether initialisation, compilation or the steps
# took its time.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# XLA's defaults, autotuning included: on an H200, --xla_gpu_autotune_level=0 cut the CPU time
# of compilation 2-3x but not its wall time, and made every step slower (r50 DETR 13x, the
# bf16 matmul peak 60x): bench/GPU_RESULTS.md, second lease.
out="${OUT:-/tmp}/gpu.md"
"${PYTHON:-python3}" bench/gpu.py --out "$out" "$@"
