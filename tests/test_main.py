"""The user-facing command: the quickstart end to end (shortened), resume by re-running, and
one-line errors for bad input."""

import glob
import os
import subprocess
import sys

import pytest
from helpers import ROOT


def _run(*flags: str, workdir: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mim_jax.main", *flags, f"--workdir={workdir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


# Per method, pairs that shrink the quickstart further for CI (the smaller compile dominates);
# SimMIM and GreenMIM keep the grain worker processes (GreenMIM plans in them).
SHRINK = {
    "simmim": "",
    "greenmim": "",
    "itpn": ",model.img_size=64,model.depth=1,decoder.depth=1,data.num_workers=0",
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SHRINK))
def test_quickstart_trains_writes_and_resumes(tmp_path, method):
    workdir = str(tmp_path / "run")
    quickstart = f"--config=configs/{method}.py:quickstart"
    config = f"{quickstart},total_steps=3,image_every_steps=2{SHRINK[method]}"
    small = ["--config.batch_size=8", "--config.log_every_steps=1"]
    first = _run(config, *small, workdir=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 3/3" in first.stderr
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert os.path.exists(os.path.join(workdir, "reconstructions", "step_00000002.png"))
    assert os.path.exists(os.path.join(workdir, "checkpoints", "3", "default"))
    assert os.path.exists(os.path.join(workdir, "config.json"))

    longer = f"{quickstart},total_steps=4,image_every_steps=2{SHRINK[method]}"
    second = _run(longer, *small, workdir=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "restored checkpoint step 3" in second.stderr
    assert "step 4/4" in second.stderr
    assert os.path.exists(os.path.join(workdir, "checkpoints", "4", "default"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.mask.ratio=1.5"], "config.mask.ratio=1.5 must be in (0, 1)"),
        (
            ["--config.data.source=folder", "--config.data.folder=/nonexistent/images"],
            "/nonexistent/images",
        ),
        (["--config.model.window_size=5"], "config.model.window_size=5"),
    ],
    ids=["bad_value", "missing_data_dir", "window_does_not_divide"],
)
def test_bad_input_is_one_line_error(tmp_path, flags, message):
    result = _run("--config=configs/simmim.py:quickstart", *flags, workdir=str(tmp_path))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mim_jax: error:"), result.stderr[-2000:]
    assert message in last
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints" / "0")
