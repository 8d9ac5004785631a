#!/usr/bin/env bash
#SBATCH --job-name=mim_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output=mim_jax-%j.out
#SBATCH --signal=USR1@120
#
# Runs mim_jax on a SLURM GPU allocation: srun starts one process per node, which uses all of the
# node's GPUs.
#
#   sbatch launch/gpu_slurm.sh --config=configs/simmim.py --workdir=/shared/runs/simmim
#   sbatch --nodes=4 launch/gpu_slurm.sh --config=... --workdir=...    (4 nodes)
#   sbatch --ntasks-per-node=8 launch/gpu_slurm.sh --config=... --workdir=...  (one process per GPU)
#   bash launch/gpu_slurm.sh --dry-run --config=... --workdir=...   (prints the srun command)
#
# Submit from the repository root: the job starts in the directory sbatch was called from. sbatch
# options on its command line override the #SBATCH lines above. Every process reads the variables
# srun sets (mim_jax/distributed.py): coordinator = first node of the step, port from the job id
# (JAX_COORDINATOR_PORT overrides it); one task per node sees every GPU, one task per GPU sees its
# own. PYTHON=... picks the interpreter (default: python). --workdir must be on a shared disk.
# SIGUSR1 two minutes before the time limit makes the run save a checkpoint and exit 0
# (docs/reliability.md); add --requeue to continue in a new allocation.
set -euo pipefail

usage() {
  echo "usage:" >&2
  sed -n '13,16p' "$0" | sed 's/^#//' >&2
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
[ "$#" -ge 1 ] || usage

cmd=(srun --ntasks-per-node="${SLURM_NTASKS_PER_NODE:-1}" --kill-on-bad-exit=1
  "${PYTHON:-python}" -m mim_jax.main "$@")
if [ "$dry_run" = "1" ]; then
  quote "${cmd[@]}"
elif [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "gpu_slurm.sh: not inside a SLURM job; submit it with sbatch (or print with --dry-run)" >&2
  exit 2
else
  exec "${cmd[@]}"
fi
