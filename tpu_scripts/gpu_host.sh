#!/usr/bin/env bash
# Merge checkpoints on one multi-GPU host (or several, with a coordinator).
#
#   tpu_scripts/gpu_host.sh setup          # install kfuse with CUDA JAX into ./.venv-gpu
#   tpu_scripts/gpu_host.sh run --config=configs/mergekit.py:merge.yml --config.output_dir=out
#
# One process drives every local GPU: `run` passes --config.num_devices=<GPU count>
# (override by giving the flag yourself), so each tensor is split by rows over a
# 1-D mesh of the GPUs. Several hosts: start the same command on each with
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<i> \
#     tpu_scripts/gpu_host.sh run ...
# which goes through `python -m kfuse.shard` (jax.distributed); process 0 writes.
# DRY_RUN=1 prints the commands.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$HERE/.venv-gpu}

run() {
  echo "+ $*" >&2
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup)
    run python3 -m venv "$VENV"
    run "$VENV/bin/pip" install -q -e "$HERE" "jax[cuda12]"
    ;;
  run)
    py="$VENV/bin/python"
    [[ -x "$py" ]] || py=python3
    ngpu=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
    extra=()
    if [[ " $* " != *"--config.num_devices="* && "$ngpu" -gt 1 ]]; then
      extra=(--config.num_devices="$ngpu")
    fi
    entry=kfuse.main
    [[ -n "${JAX_COORDINATOR_ADDRESS:-}" ]] && entry=kfuse.shard
    cd "$HERE"
    run "$py" -m "$entry" "$@" "${extra[@]}"
    ;;
  *)
    sed -n '2,14p' "$0"
    ;;
esac
