#!/usr/bin/env bash
# Trains E2E-VLP on every worker of a Cloud TPU VM pod slice (v4-32, v5p-64, ...).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [launch/train.py flags...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b --config configs/pretrain.py:base \
#       --workdir /mnt/shared/e2e_vlp/pretrain_base
#
# 1. copies this checkout (the files git tracks or does not ignore) to ~/e2e-vlp on every
#    worker; 2. creates ~/e2e-vlp/.venv there with uv (Python $PYTHON_VERSION, default 3.11)
#    and installs requirements.txt with jax[tpu];
# 3. starts launch/train.py on all workers at once (gcloud ... ssh --worker=all). JAX finds
# the other workers of the slice by itself (e2e_vlp/train/distributed.py). Use a
# filesystem every worker mounts at the same path (Filestore, or a bucket mounted with
# gcsfuse) as --workdir: all workers write their checkpoint shards there. The command runs in the foreground; keep the terminal alive
# (tmux) or stop it with Ctrl-C. Re-running resumes from the newest checkpoint.
#
# Environment: PROJECT (gcloud project; default: gcloud's), SETUP=0 (skip steps 1-2 when
# the workers are already set up), REMOTE_DIR (default e2e-vlp, relative to the home),
# PYTHON_VERSION (default 3.11).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
TPU_NAME="$1"
ZONE="$2"
shift 2
REMOTE_DIR="${REMOTE_DIR:-e2e-vlp}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
FLAGS=("--zone=${ZONE}" "--worker=all")
if [[ -n "${PROJECT:-}" ]]; then
  FLAGS+=("--project=${PROJECT}")
fi

on_all_workers() {
  "${GCLOUD[@]}" ssh "${TPU_NAME}" "${FLAGS[@]}" --command="$1"
}

if [[ "${SETUP:-1}" != 0 ]]; then
  jax_version="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "${ROOT}/requirements.txt")"
  staging="$(mktemp -d)"
  trap 'rm -rf "${staging}"' EXIT
  archive="${staging}/e2e-vlp.tar.gz"
  (cd "${ROOT}" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 tar -czf "${archive}" --)
  "${GCLOUD[@]}" scp "${archive}" "${TPU_NAME}:~/e2e-vlp.tar.gz" "${FLAGS[@]}"
  # uv provides the Python the pins need (the TPU VM images ship an older one).
  on_all_workers "set -e; mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/e2e-vlp.tar.gz -C ~/${REMOTE_DIR}
    command -v uv >/dev/null || python3 -m pip install -q --user uv
    export PATH=\$HOME/.local/bin:\$PATH
    cd ~/${REMOTE_DIR} && uv venv -q --allow-existing --python ${PYTHON_VERSION} .venv
    uv pip install -q --python .venv/bin/python -r requirements.txt 'jax[tpu]==${jax_version}' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi

train_flags=""
if [[ $# -gt 0 ]]; then
  train_flags="$(printf '%q ' "$@")"
fi
on_all_workers "cd ~/${REMOTE_DIR} && .venv/bin/python launch/train.py ${train_flags}"
