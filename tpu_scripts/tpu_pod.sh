#!/usr/bin/env bash
# Merge checkpoints on a Cloud TPU VM pod slice with kfuse (multi-host, jax.distributed).
#
#   TPU_NAME=kfuse-v4 ZONE=us-central2-b ACCEL=v4-32 tpu_scripts/tpu_pod.sh create
#   tpu_scripts/tpu_pod.sh setup                 # copy this checkout to every worker, install
#   tpu_scripts/tpu_pod.sh stage gs://bucket/models /data/models   # inputs onto every worker
#   tpu_scripts/tpu_pod.sh run --config=configs/mergekit.py:/data/merge.yml \
#       --config.output_dir=/data/out --config.num_devices=16
#   tpu_scripts/tpu_pod.sh collect /data/out ./out   # the output is written by worker 0
#   tpu_scripts/tpu_pod.sh delete
#
# `run` starts the same command on every worker at once (gcloud --worker=all):
# `python -m kfuse.shard FLAGS` joins the run with jax.distributed.initialize()
# (TPU pods need no addresses), builds a 1-D mesh over all chips of the slice,
# reads on each worker only the rows of every tensor its chips hold, and
# worker 0 gathers and writes the merged model. Inputs must be at the same path
# on every worker (`stage` copies them; a shared/fuse mount works too).
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

TPU_NAME=${TPU_NAME:-kfuse-pod}
ZONE=${ZONE:-us-central2-b}
ACCEL=${ACCEL:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null || echo my-project)}
REMOTE_DIR=${REMOTE_DIR:-kfuse}
HERE=$(cd "$(dirname "$0")/.." && pwd)

run() {
  echo "+ $*" >&2
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}

tpu() { run gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

cmd=${1:-help}
shift || true
case "$cmd" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCEL" --version="$VERSION"
    ;;
  setup)
    tar -C "$HERE" --exclude=.git --exclude='*.pyc' --exclude=workdirs -czf /tmp/kfuse-src.tgz .
    tpu scp /tmp/kfuse-src.tgz "$TPU_NAME":/tmp/kfuse-src.tgz --worker=all
    on_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/kfuse-src.tgz && \
      cd $REMOTE_DIR && pip install -q -e . 'jax[tpu]' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    ;;
  stage)          # stage SRC DST: copy inputs (gs:// or a worker-visible path) to every worker
    on_all "mkdir -p $2 && gsutil -m rsync -r $1 $2"
    ;;
  run)            # run FLAGS...: the same kfuse command on every worker
    flags=$(printf ' %q' "$@")
    on_all "cd $REMOTE_DIR && python -m kfuse.shard$flags 2>&1 | tee -a /tmp/kfuse-run.log"
    ;;
  collect)        # collect REMOTE_OUT LOCAL_DIR: fetch the output written by worker 0
    mkdir -p "$2"
    tpu scp --recurse "$TPU_NAME":"$1" "$2" --worker=0
    ;;
  logs)
    on_all "tail -n 20 /tmp/kfuse-run.log"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,22p' "$0"
    ;;
esac
