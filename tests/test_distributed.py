"""initialize_distributed: which environments connect, and with what arguments (nothing connects).

`jax.distributed.initialize` is replaced by a recorder that also runs jax's own cluster
auto-detection on the arguments it was given, so the tests see the coordinator, process count,
process id and local devices jax would really use.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import pytest
from jax._src import cloud_tpu_init
from jax._src.clusters import ClusterEnv

from mim_jax import distributed
from mim_jax.config_lib import ConfigError

_CLEARED_PREFIXES = ("SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "JAX_COORDINATOR", "CUDA_VISIBLE")
_CLEARED = (
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "JAX_LOCAL_DEVICE_IDS",
    "KUBERNETES_SERVICE_HOST",
)
# SLURM_JOB_ID=12345 -> jax's port rule: 12345 % 4096 + 61440 = 57 + 61440.
_SLURM_COORDINATOR = "node001:61497"


@dataclasses.dataclass
class Call:
    given: dict
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: list[int] | None


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """A clean environment (no cluster, not a TPU VM) and a recording jax.distributed."""
    for key in list(os.environ):
        if key.startswith(_CLEARED_PREFIXES) or key in _CLEARED:
            monkeypatch.delenv(key)
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)
    recorded: list[Call] = []

    def initialize(**given):
        method = given.get("cluster_detection_method")
        args = (
            given.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS"),
            given.get("num_processes"),
            given.get("process_id"),
            given.get("local_device_ids"),
        )
        if method != "deactivate" and None in args:  # as jax's initialize does
            args = ClusterEnv.auto_detect_unset_distributed_params(*args, method, 300)
        recorded.append(Call(given, *args))

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return recorded


def _srun_task(
    monkeypatch: pytest.MonkeyPatch, nodes: int, per_node: int, node: int, local: int, gpus: str
) -> None:
    """The environment srun gives one task (job 12345 on node001..node00N)."""
    env = {
        "SLURM_JOB_ID": "12345",
        "SLURM_JOB_NODELIST": f"node[001-00{nodes}]",
        "SLURM_STEP_NODELIST": f"node[001-00{nodes}]",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node * per_node + local),
        "SLURM_LOCALID": str(local),
        "CUDA_VISIBLE_DEVICES": gpus,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_tpu_vm_without_worker_hostnames_initializes(calls, monkeypatch):
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    distributed.initialize_distributed()
    assert len(calls) == 1
    assert calls[0].given == {}  # jax reads hosts and ids from the TPU metadata


def test_slurm_one_task_per_node_sees_all_gpus(calls, monkeypatch, caplog):
    _srun_task(monkeypatch, nodes=4, per_node=1, node=2, local=0, gpus="0,1,2,3,4,5,6,7")
    with caplog.at_level(logging.INFO):
        distributed.initialize_distributed()
    assert [dataclasses.astuple(c)[1:] for c in calls] == [(_SLURM_COORDINATOR, 4, 2, None)]
    assert "one process per node" in caplog.text


def test_slurm_one_task_per_node_honours_coordinator_port(calls, monkeypatch):
    _srun_task(monkeypatch, nodes=2, per_node=1, node=0, local=0, gpus="0,1")
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "1234")
    distributed.initialize_distributed()
    assert [c.coordinator for c in calls] == ["node001:1234"]


def test_slurm_one_task_per_gpu_is_jax_default(calls, monkeypatch, caplog):
    _srun_task(monkeypatch, nodes=4, per_node=8, node=2, local=3, gpus="0,1,2,3,4,5,6,7")
    with caplog.at_level(logging.INFO):
        distributed.initialize_distributed()
    assert [dataclasses.astuple(c)[1:] for c in calls] == [(_SLURM_COORDINATOR, 32, 19, [3])]
    assert calls[0].given == {}
    assert "one process per GPU" in caplog.text


def test_slurm_task_bound_to_one_gpu_uses_it(calls, monkeypatch):
    """--gpus-per-task=1: CUDA_VISIBLE_DEVICES holds the task's GPU only (ordinal 0, not 3)."""
    _srun_task(monkeypatch, nodes=2, per_node=8, node=1, local=3, gpus="3")
    distributed.initialize_distributed()
    assert [dataclasses.astuple(c)[1:] for c in calls] == [(_SLURM_COORDINATOR, 16, 11, None)]


def test_slurm_uneven_nodes_use_this_nodes_count(calls, monkeypatch):
    _srun_task(monkeypatch, nodes=3, per_node=8, node=2, local=0, gpus="0,1,2,3,4,5,6,7")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x2),1")
    monkeypatch.setenv("SLURM_NTASKS", "17")
    monkeypatch.setenv("SLURM_PROCID", "16")
    distributed.initialize_distributed()
    assert [dataclasses.astuple(c)[1:] for c in calls] == [(_SLURM_COORDINATOR, 17, 16, None)]


def test_slurm_tasks_not_matching_gpus_is_one_line_error(calls, monkeypatch):
    _srun_task(monkeypatch, nodes=2, per_node=2, node=0, local=1, gpus="0,1,2,3,4,5,6,7")
    with pytest.raises(ConfigError, match=r"--ntasks-per-node=1.*--ntasks-per-node=8") as e:
        distributed.initialize_distributed()
    assert "\n" not in str(e.value)
    assert calls == []


def test_sbatch_without_srun_stays_one_process(calls, monkeypatch):
    """The batch script's environment: job variables, no SLURM_STEP_* (only srun sets those)."""
    for key, value in {
        "SLURM_JOB_ID": "12345",
        "SLURM_JOB_NODELIST": "node[001-004]",
        "SLURM_NTASKS": "4",
        "SLURM_TASKS_PER_NODE": "1(x4)",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    distributed.initialize_distributed()
    assert calls == []


def test_explicit_jax_variables(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    distributed.initialize_distributed()
    assert [dataclasses.astuple(c)[1:] for c in calls] == [("10.0.0.1:1234", 2, 1, None)]
    assert calls[0].given["num_processes"] == 2 and calls[0].given["process_id"] == 1


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID missing"),
        ({"JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES missing"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "a"},
            "not",
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            "range",
        ),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not set"),
    ],
)
def test_incomplete_jax_variables_are_one_line_config_error(calls, monkeypatch, env, named):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=named) as e:
        distributed.initialize_distributed()
    assert "\n" not in str(e.value) and "JAX_PROCESS_ID=" in str(e.value)
    assert calls == []


def test_no_multi_host_environment_is_one_process(calls):
    distributed.initialize_distributed()
    assert calls == []


def test_already_initialized_is_left_alone(calls, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    _srun_task(monkeypatch, nodes=2, per_node=1, node=0, local=0, gpus="0")
    distributed.initialize_distributed()
    assert calls == []
