#!/usr/bin/env bash
# Manages a Cloud TPU VM (single host or pod slice) for mim_jax: every host runs the same command.
#
#   bash launch/tpu_pod.sh [--dry-run] create TPU_NAME ZONE ACCELERATOR [VERSION]
#   bash launch/tpu_pod.sh [--dry-run] setup  TPU_NAME ZONE
#   bash launch/tpu_pod.sh [--dry-run] run    TPU_NAME ZONE --config=... --workdir=gs://...
#   bash launch/tpu_pod.sh [--dry-run] logs   TPU_NAME ZONE [WORKER|all]
#   bash launch/tpu_pod.sh [--dry-run] stop   TPU_NAME ZONE
#   bash launch/tpu_pod.sh [--dry-run] delete TPU_NAME ZONE
#   [SETUP=1] bash launch/tpu_pod.sh TPU_NAME ZONE [flags...]   (setup if SETUP=1, then run in
#                                                                the foreground, output here)
#
# create: a TPU VM (VERSION defaults to tpu-ubuntu2204-base). setup: copies the committed HEAD of
# this checkout to ~/mim_jax on every host and installs requirements.txt plus jax[tpu]. run: starts
# `python3 -m mim_jax.main FLAGS` on every host detached from ssh (setsid nohup), appending to
# ~/mim_jax.log; a dropped connection does not stop it. logs: follows that log on worker 0 (the
# one that reports progress; WORKER picks another, `all` every host). stop: ends the run on every
# host. delete: deletes the TPU VM (gcloud asks first). All hosts write to the same --workdir
# (use gs://). PROJECT=... adds --project. --dry-run (or DRY_RUN=1) prints every command, one per
# line, quoted exactly as it would run, and runs nothing.
set -euo pipefail

usage() {
  echo "usage:" >&2
  sed -n '4,11p' "$0" | sed 's/^#//' >&2
  exit 2
}

# Prints its arguments as one line a shell reads back as the same words.
quote() {
  local word out=() sq="'" esc="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//$sq/$esc}'")
    fi
  done
  local IFS=' '
  printf '%s\n' "${out[*]-}"
}

dry_run="${DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi

# Runs a command, or prints it under --dry-run.
do_cmd() {
  if [ "$dry_run" = "1" ]; then quote "$@"; else "$@"; fi
}

[ "$#" -ge 2 ] || usage
case "$1" in
  create | setup | run | logs | stop | delete) action="$1"; shift ;;
  *) action=legacy ;;
esac
[ "$#" -ge 2 ] || usage
tpu="$1"
zone="$2"
shift 2
project_flag=()
if [ -n "${PROJECT:-}" ]; then project_flag=(--project "$PROJECT"); fi
here="$(cd "$(dirname "$0")/.." && pwd)"
# Paths on the TPU hosts, expanded there.
# shellcheck disable=SC2088
log='~/mim_jax.log' pid='~/mim_jax.pid'

ssh_on() {  # WORKER COMMAND
  do_cmd gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" \
    ${project_flag[@]+"${project_flag[@]}"} --worker="$1" --command "$2"
}

setup() {
  local archive="${TMPDIR:-/tmp}/mim_jax_$tpu.tar.gz"
  do_cmd git -C "$here" archive --format=tar.gz -o "$archive" HEAD
  do_cmd gcloud compute tpus tpu-vm scp "$archive" "$tpu:~/mim_jax.tar.gz" --zone "$zone" \
    ${project_flag[@]+"${project_flag[@]}"} --worker=all
  ssh_on all "mkdir -p ~/mim_jax && tar -xzf ~/mim_jax.tar.gz -C ~/mim_jax && cd ~/mim_jax && \
pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
}

main_cmd="python3 -m mim_jax.main"
if [ "$#" -gt 0 ]; then main_cmd="$main_cmd $(quote "$@")"; fi

case "$action" in
  create)
    [ "$#" -ge 1 ] && [ "$#" -le 2 ] || usage
    do_cmd gcloud compute tpus tpu-vm create "$tpu" --zone "$zone" \
      ${project_flag[@]+"${project_flag[@]}"} --accelerator-type "$1" \
      --version "${2:-tpu-ubuntu2204-base}"
    ;;
  setup)
    [ "$#" -eq 0 ] || usage
    setup
    ;;
  run)
    [ "$#" -ge 1 ] || usage
    ssh_on all "cd ~/mim_jax || exit 1; if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then \
echo \"mim_jax is already running here: stop it first\" >&2; exit 1; fi; \
TF_CPP_MIN_LOG_LEVEL=3 setsid nohup $main_cmd >> $log 2>&1 < /dev/null & echo \$! > $pid"
    ;;
  logs)
    [ "$#" -le 1 ] || usage
    ssh_on "${1:-0}" "tail -n 200 -F $log"
    ;;
  stop)
    [ "$#" -eq 0 ] || usage
    ssh_on all "if [ -f $pid ]; then kill -- -\"\$(cat $pid)\" 2>/dev/null; rm -f $pid; fi"
    ;;
  delete)
    [ "$#" -eq 0 ] || usage
    do_cmd gcloud compute tpus tpu-vm delete "$tpu" --zone "$zone" \
      ${project_flag[@]+"${project_flag[@]}"}
    ;;
  legacy)
    if [ "${SETUP:-0}" = "1" ]; then setup; fi
    ssh_on all "cd ~/mim_jax && TF_CPP_MIN_LOG_LEVEL=3 $main_cmd"
    ;;
esac
