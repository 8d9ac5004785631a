"""Connecting the processes of a multi-host job (TPU VM, SLURM, JAX_* variables) before any jax use.

Two facts of jax 0.10.2 shape this module:
- On a Cloud TPU VM jax finds its peers from the TPU metadata server; nothing in the environment
  says "multi-host" (`TPU_WORKER_HOSTNAMES` is set on GKE only). Orbax's async checkpointer and
  preemption sync need the distributed client even on one host, so on TPU we always initialize
  (as maxtext does whenever async checkpointing is on).
- Under `srun`, jax's SLURM detection makes every process see ONE GPU (`SLURM_LOCALID`), which
  is right for one task per GPU and wrong for one task per node. We choose explicitly.
"""

from __future__ import annotations

import logging
import os
import re

import jax
from jax._src import cloud_tpu_init
from jax._src.clusters import SlurmCluster

from mim_jax.config_lib import ConfigError

# The variables jax's SlurmCluster.is_env_present requires. The SLURM_STEP_* ones are set by srun
# for its tasks only, so a plain `python` in an sbatch script (whose environment has
# SLURM_JOB_ID and SLURM_NTASKS) does not match.
_SRUN_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
# Tasks per node, most specific first: srun's own step, its --ntasks-per-node, the job's layout.
_TASKS_PER_NODE_VARS = (
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
)
_EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed() -> None:
    """Connects the processes of a multi-host job; does nothing for a single process.

    The first rule that applies wins:
    1. `jax.distributed` is already initialized: nothing.
    2. `JAX_NUM_PROCESSES` or `JAX_PROCESS_ID` is set: all of `JAX_COORDINATOR_ADDRESS=host:port`,
       `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` must be (integers, 0 <= id < count), else
       ConfigError; every local device is used unless `JAX_LOCAL_DEVICE_IDS` says otherwise.
    3. A Cloud TPU VM (jax found TPU chips and libtpu when it was imported, the flag its TPU
       cluster detection checks): always initialize, single-host VMs too; jax reads the rest.
    4. An srun task (the variables jax's SLURM detection reads): one process per node when this
       node runs one task (it gets every GPU it can see); one process per GPU when it runs more
       (jax's default: GPU number SLURM_LOCALID, or the one GPU SLURM bound to the task). More
       than one task per node with visible GPUs not one per task is a ConfigError.
    5. `JAX_COORDINATOR_ADDRESS` alone: ConfigError. Anything else (a laptop, `python` in an
       sbatch script without srun): one process.
    Outside TPU VMs and srun, set the three JAX_* variables on every process.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
        _initialize_explicit()
    elif cloud_tpu_init.running_in_cloud_tpu_vm:
        logging.info("jax.distributed: Cloud TPU VM, the TPU metadata names the hosts")
        jax.distributed.initialize()
    elif all(k in env for k in _SRUN_VARS):
        _initialize_slurm()
    elif "JAX_COORDINATOR_ADDRESS" in env:
        raise ConfigError(_explicit_usage("JAX_NUM_PROCESSES and JAX_PROCESS_ID are not set"))
    elif "SLURM_JOB_ID" in env:
        logging.info("jax.distributed: SLURM job outside srun, running as one process")


def _explicit_usage(problem: str) -> str:
    """The one-line message for incomplete or malformed JAX_* variables."""
    shown = ", ".join(f"{k}={os.environ.get(k, '<unset>')}" for k in _EXPLICIT_VARS)
    return (
        f"multi-process environment: {problem} ({shown}); set JAX_COORDINATOR_ADDRESS=host:port, "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 <= id < count) on every process"
    )


def _initialize_explicit() -> None:
    """Rule 2: the process layout comes from JAX_* variables alone."""
    missing = [k for k in _EXPLICIT_VARS if not os.environ.get(k)]
    if missing:
        raise ConfigError(_explicit_usage(f"{' and '.join(missing)} missing"))
    try:
        count = int(os.environ["JAX_NUM_PROCESSES"])
        index = int(os.environ["JAX_PROCESS_ID"])
    except ValueError:
        raise ConfigError(_explicit_usage("not integers")) from None
    if not 0 <= index < count:
        raise ConfigError(_explicit_usage("process id out of range"))
    address = os.environ["JAX_COORDINATOR_ADDRESS"]
    logging.info("jax.distributed: process %d of %d, coordinator %s", index, count, address)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=count,
        process_id=index,
        cluster_detection_method="deactivate",
    )


def _expand_tasks_per_node(name: str, value: str) -> list[int]:
    """SLURM's compressed per-node task counts, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ConfigError(f"SLURM: cannot read {name}={value!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def _tasks_on_this_node() -> int:
    """How many tasks of this srun step run on this node."""
    name = next((k for k in _TASKS_PER_NODE_VARS if os.environ.get(k)), None)
    if name is None:
        raise ConfigError(f"SLURM: none of {', '.join(_TASKS_PER_NODE_VARS)} is set")
    counts = _expand_tasks_per_node(name, os.environ[name])
    if len(set(counts)) == 1:
        return counts[0]
    node = os.environ.get("SLURM_NODEID", "")
    if not node.isdigit() or int(node) >= len(counts):
        raise ConfigError(f"SLURM: {name}={os.environ[name]} but SLURM_NODEID={node!r}")
    return counts[int(node)]


def _visible_gpus() -> int | None:
    """GPUs this process may use as SLURM set them (CUDA_VISIBLE_DEVICES), None when unset."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    return len(devices.split(",")) if devices else None


def _initialize_slurm() -> None:
    """Rule 4: one process per node (all its GPUs) or one per GPU, from the tasks per node."""
    tasks, gpus = _tasks_on_this_node(), _visible_gpus()
    if tasks == 1 or gpus == 1:
        layout = "one process per node" if tasks == 1 else "one process per GPU (bound by SLURM)"
        logging.info("jax.distributed: SLURM, %s: every visible GPU (%s)", layout, gpus or "all")
        # jax's SLURM detection would restrict us to GPU SLURM_LOCALID; give it the layout
        # itself so that no device restriction applies.
        port = os.environ.get("JAX_COORDINATOR_PORT")
        address = os.environ.get("JAX_COORDINATOR_ADDRESS") or SlurmCluster.get_coordinator_address(
            timeout_secs=None, override_coordinator_port=port
        )
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["SLURM_NTASKS"]),
            process_id=int(os.environ["SLURM_PROCID"]),
            cluster_detection_method="deactivate",
        )
    elif gpus is None or gpus == tasks:
        local = os.environ["SLURM_LOCALID"]
        logging.info(
            "jax.distributed: SLURM, one process per GPU (%d per node): GPU %s", tasks, local
        )
        jax.distributed.initialize()
    else:
        raise ConfigError(
            f"SLURM: {tasks} tasks on this node see {gpus} GPUs; run one task per node "
            f"(--ntasks-per-node=1, all GPUs) or one per GPU (--ntasks-per-node={gpus})"
        )
