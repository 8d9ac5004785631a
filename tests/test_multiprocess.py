"""Two processes on localhost (jax.distributed, 4 CPU devices each) train like one process of 8
devices: SimMIM, GreenMIM with replicated mask-group plans on a mesh that is not host-major,
iTPN (EMA teacher) with the `tensor` axis spanning the processes, and a multi-slice (DCN) data
axis. A 2-process checkpoint continues identically in 1 process; every host reads only its
own rows; only process 0 writes files; a SIGTERM that reaches one host stops every host at
one step. Each run is `tests/multiprocess_worker.py`."""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

WORKER = ROOT / "tests" / "multiprocess_worker.py"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(tmp_path, name: str, *, processes: int, workdir: str | None = None, **options):
    """Runs the worker in `processes` processes (8 devices in all); returns their results."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
        "JAX_PLATFORMS": "cpu",
    }
    workdir = workdir or str(tmp_path / name)
    port = _free_port()
    flags = [f"--{k}={v}" for k, v in options.items()]
    runs = []
    for pid in range(processes):
        out = tmp_path / f"{name}_{pid}.json"
        command = [sys.executable, str(WORKER), f"--workdir={workdir}", f"--out={out}", *flags]
        if processes > 1:
            command += [f"--process_id={pid}", f"--num_processes={processes}", f"--port={port}"]
        log = open(tmp_path / f"{name}_{pid}.log", "w")  # noqa: SIM115
        runs.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log), out))
    results = []
    for pid, (proc, out) in enumerate(runs):
        code = proc.wait(timeout=900)
        log = (tmp_path / f"{name}_{pid}.log").read_text()
        assert code == 0, log[-4000:]
        results.append(json.loads(out.read_text()))
    return results


def _losses(result: dict) -> np.ndarray:
    return np.array([result["metrics"][s]["loss"] for s in sorted(result["metrics"], key=int)])


def _assert_same_training(one: dict, many: list[dict]) -> None:
    """First-step loss and gradient norm to 1e-6, every logged loss to 1e-4 (relative)."""
    first = one["metrics"]["1"]
    for result in many:
        ours = result["metrics"]["1"]
        np.testing.assert_allclose(ours["loss"], first["loss"], rtol=1e-6)
        np.testing.assert_allclose(ours["grad_norm"], first["grad_norm"], rtol=1e-6)
    # Process 0 logs the metrics; the others log nothing but run the same steps.
    np.testing.assert_allclose(_losses(many[0]), _losses(one), rtol=1e-4)


def test_simmim_two_processes_equal_one_and_continue_in_one(tmp_path):
    one = _launch(tmp_path, "one", processes=1, method="simmim", mesh="8,1,1", steps=10)
    two = _launch(tmp_path, "two", processes=2, method="simmim", mesh="8,1,1", steps=10)
    _assert_same_training(one[0], two)
    # Every host read exactly its own rows: host p the p-th half of every global batch.
    for result in two:
        rows = np.array(result["indices"]).reshape(10, 8) % 16
        np.testing.assert_array_equal(rows, np.tile(np.arange(8) + 8 * result["process"], (10, 1)))
    # Only process 0 wrote files: one events file, named with its pid, and the images.
    events = glob.glob(str(tmp_path / "two" / "events.out.tfevents.*"))
    chief = next(r for r in two if r["process"] == 0)
    assert len(events) == 1 and f".{chief['pid']}." in os.path.basename(events[0])
    assert os.path.exists(tmp_path / "two" / "reconstructions" / "step_00000010.png")
    assert len(two[1]["metrics"]) == 10  # The loop ran; only its logging was quiet.

    # The 2-process checkpoint continues in 1 process exactly as the 1-process one does.
    more = dict(method="simmim", mesh="-1,1,1", steps=13)
    after_two = _launch(tmp_path, "after_two", processes=1, workdir=str(tmp_path / "two"), **more)
    after_one = _launch(tmp_path, "after_one", processes=1, workdir=str(tmp_path / "one"), **more)
    assert sorted(after_two[0]["metrics"], key=int) == ["11", "12", "13"]
    np.testing.assert_array_equal(_losses(after_two[0]), _losses(after_one[0]))


def test_greenmim_replicated_plans_on_a_mesh_that_is_not_host_major(tmp_path):
    """2 mask groups over 8 batch shards: plans replicated, rows paired with their group's
    plan by global row, while the devices alternate between the processes."""
    options = dict(method="greenmim", mesh="8,1,1", groups=2, steps=4)
    one = _launch(tmp_path, "one", processes=1, **options)
    two = _launch(tmp_path, "two", processes=2, order="interleaved", **options)
    _assert_same_training(one[0], two)
    for result in two:  # Host p holds the rows of its devices: every other pair of rows.
        rows = sorted(set(np.array(result["indices"]) % 16))
        assert rows == [r for r in range(16) if (r // 2) % 2 == result["process"]]


def test_itpn_teacher_with_the_tensor_axis_across_processes(tmp_path):
    """data=4 x tensor=2 with each tensor pair on two processes: both hosts feed every row
    (replicas), the EMA teacher is sharded like the student."""
    options = dict(method="itpn", mesh="4,1,2", steps=4)
    one = _launch(tmp_path, "one", processes=1, **options)
    two = _launch(tmp_path, "two", processes=2, order="interleaved", **options)
    _assert_same_training(one[0], two)
    for result in two:
        assert sorted(set(np.array(result["indices"]) % 16)) == list(range(16))


def test_multi_slice_data_axis_over_processes(tmp_path):
    """`mesh.dcn_data=2`: the data axis spans the two processes (slices) by the hybrid mesh."""
    one = _launch(tmp_path, "one", processes=1, method="simmim", mesh="8,1,1", steps=3)
    two = _launch(tmp_path, "two", processes=2, method="simmim", mesh="8,1,1", dcn=2, steps=3)
    _assert_same_training(one[0], two)


def test_sigterm_on_one_host_stops_every_host_at_the_same_step(tmp_path):
    """Only process 0 gets SIGTERM (at its 5th batch): both agree on a step, save it together
    (one checkpoint, not a periodic one) and exit 0."""
    two = _launch(
        tmp_path, "two", processes=2, method="simmim", mesh="8,1,1", steps=12, sigterm_at=5
    )
    stopped = [max(int(s) for s in result["metrics"]) for result in two]
    assert stopped[0] == stopped[1] and 5 <= stopped[0] < 12, stopped
    saved = [n for n in os.listdir(tmp_path / "two" / "checkpoints") if n.isdigit()]
    assert saved == [str(stopped[0])]
