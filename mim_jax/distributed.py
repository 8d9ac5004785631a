"""Connecting the processes of a multi-host job (TPU pod, multi-node GPU) before any jax use."""

from __future__ import annotations

import os

import jax


def initialize_distributed() -> None:
    """Connects the hosts of a multi-host job (TPU pod, multi-node GPU) before any jax use.

    On Cloud TPU every host runs the same command and jax finds its peers itself; on GPU
    clusters the coordinator comes from the usual environment variables (SLURM or
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    """
    multi_host_env = any(
        k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS")
    )
    if not multi_host_env or jax.distributed.is_initialized():
        return
    kwargs = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
