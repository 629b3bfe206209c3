#!/usr/bin/env bash
# Runs one vqvae2_jax stage on every worker (host) of a Cloud TPU VM slice.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh \
#       --config=configs/imagenet256.py:vqvae --workdir=/mnt/shared/runs/in256
#
# The arguments are those of `python -m vqvae2_jax.main`; this script adds
# --config.distributed.initialize=True, so every worker calls a bare
# jax.distributed.initialize(), which finds the slice's coordinator, process count and
# process id by itself on TPU VMs. Each worker then reads only its slice of every global
# batch, and orbax writes one checkpoint together from all workers.
#
# The command runs on all workers at once (`gcloud compute tpus tpu-vm ssh
# --worker=all`); it must run on every worker, or the others wait for the missing one.
#
# Environment variables:
#   TPU_NAME     (required) name of the TPU VM slice.
#   ZONE         (required) its zone, e.g. us-central2-b.
#   PROJECT      Google Cloud project (default: gcloud's configured project).
#   REMOTE_DIR   repository directory on each worker (default: vqvae2_jax, i.e. ~/vqvae2_jax).
#   SYNC=1       first copy this checkout (tracked and untracked, non-ignored files) to
#                REMOTE_DIR on every worker.
#   INSTALL=1    first run `pip install -e REMOTE_DIR[gcs]` and JAX's TPU wheels on every worker.
#   JAX_SPEC     the JAX requirement INSTALL uses (default: 'jax[tpu]==0.10.2', setup.py's tpu extra).
#   PYTHON       interpreter on the workers (default: python3).
#   DETACH=1     start the job with nohup and return; each worker logs to
#                REMOTE_DIR/logs/<stage-time>.log (otherwise the output streams here and
#                the job stops when this ssh session ends).
#   DRY_RUN=1    print the gcloud commands instead of running them.
#
# The workdir must be storage every worker sees under the same path (NFS/Filestore, or a
# bucket mounted with gcsfuse): orbax writes one checkpoint from all hosts, and
# process 0 writes metrics and pictures. Per-worker local disks do not work for it.
set -euo pipefail

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the zone of the TPU VM slice}"
REMOTE_DIR="${REMOTE_DIR:-vqvae2_jax}"
PYTHON="${PYTHON:-python3}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]==0.10.2}"

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then COMMON+=(--project="$PROJECT"); fi

run() {  # prints (DRY_RUN=1) or runs a command
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_workers() {  # runs one shell command line on every worker
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --command="$1"
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RDIR="$(printf '%q' "$REMOTE_DIR")"

if [[ "${SYNC:-0}" == 1 ]]; then
  # One tarball of the checkout (git's view of it: no virtualenvs, runs or caches).
  archive="$(mktemp -d)/vqvae2_jax_src.tar.gz"
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
     | tar --null -T - -czf "$archive")
  run "${GCLOUD[@]}" scp "$archive" "$TPU_NAME:vqvae2_jax_src.tar.gz" "${COMMON[@]}"
  on_all_workers "mkdir -p $RDIR && tar -xzf vqvae2_jax_src.tar.gz -C $RDIR \
&& rm vqvae2_jax_src.tar.gz"
fi

if [[ "${INSTALL:-0}" == 1 ]]; then
  on_all_workers "cd $RDIR && $PYTHON -m pip install -q -U pip \
&& $PYTHON -m pip install -q -e '.[gcs]' $(printf '%q' "$JAX_SPEC")"
fi

# The stage command, quoted so that it reaches the workers' shell unchanged.
stage_cmd="$(printf '%q ' "$PYTHON" -m vqvae2_jax.main "$@" \
  --config.distributed.initialize=True)"
if [[ "${DETACH:-0}" == 1 ]]; then
  log="logs/vqvae2-$(date +%Y%m%d-%H%M%S).log"
  remote="cd $RDIR && mkdir -p logs && nohup $stage_cmd > $log 2>&1 < /dev/null & \
echo \"\$(hostname): started, log $REMOTE_DIR/$log\""
else
  remote="cd $RDIR && $stage_cmd"
fi
on_all_workers "$remote"
