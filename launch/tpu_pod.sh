#!/usr/bin/env bash
# Runs mim_jax on every host of a Cloud TPU VM pod slice (the same command on each host).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE [mim_jax.main flags...]
#
# With SETUP=1 it first copies this checkout to ~/mim_jax on every host and installs the
# requirements plus jax[tpu]. The output of every host streams to this terminal (run it inside
# tmux or screen so a dropped connection does not stop the job); all hosts write to the same
# --workdir (use a gs:// path).
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: [SETUP=1] bash launch/tpu_pod.sh TPU_NAME ZONE [--config=... --workdir=gs://...]" >&2
  exit 2
fi
tpu="$1"
zone="$2"
shift 2
project_flag=()
if [ -n "${PROJECT:-}" ]; then project_flag=(--project "$PROJECT"); fi
here="$(cd "$(dirname "$0")/.." && pwd)"

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all \
    --command "$1"
}

if [ "${SETUP:-0}" = "1" ]; then
  archive="$(mktemp -d)/mim_jax.tar.gz"
  git -C "$here" archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$tpu":~/mim_jax.tar.gz --zone "$zone" \
    "${project_flag[@]}" --worker=all
  ssh_all "mkdir -p ~/mim_jax && tar -xzf ~/mim_jax.tar.gz -C ~/mim_jax && cd ~/mim_jax && \
    pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
fi

args="$(printf '%q ' "$@")"
ssh_all "cd ~/mim_jax && TF_CPP_MIN_LOG_LEVEL=3 python3 -m mim_jax.main $args"
