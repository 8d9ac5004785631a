"""The user-facing commands: the quickstart end to end (shortened) with no library start-up
chatter, resume by re-running, and the chain pretrain -> fine-tune -> kNN / linear probe /
top-1 -> export (on one shared pretraining run). One-line errors: test_cli_errors.py."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import ROOT

# The fine-tune / evaluate / export chain runs on one CPU device: sharding is tested in-process;
# 8 forced devices per subprocess beside two busy test workers on 2 cores only add contention.
ONE_DEVICE = {**os.environ, "XLA_FLAGS": ""}
# What a user's shell has: none of the TensorFlow / JAX settings conftest adds for the tests, so
# the quickstart shows what a user sees.
USER_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "JAX_PLATFORMS")
}
# Library start-up lines that mim_jax.cli silences: TensorFlow's (in the main process and in
# grain's workers) and jax's backend probe.
STARTUP_NOISE = (
    "absl::InitializeLog",
    "oneDNN custom operations",
    "This TensorFlow binary is optimized",
    "Unable to initialize backend",
)


def _run(
    *flags: str, workdir: str, module: str = "mim_jax.main", env: dict | None = None
) -> subprocess.CompletedProcess:
    workdir_flag = [f"--workdir={workdir}"] if workdir else []
    return subprocess.run(
        [sys.executable, "-m", module, *flags, *workdir_flag],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=env,
    )


# Per method, pairs that shrink the quickstart further for CI (the smaller compile dominates);
# SimMIM and GreenMIM keep the grain worker processes (GreenMIM plans in them).
SHRINK = {
    "simmim": "",
    "greenmim": "",
    "itpn": ",model.img_size=64,model.depth=1,decoder.depth=1,data.num_workers=0",
}


def _startup_noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in STARTUP_NOISE)]


def _quickstart_trains_writes_and_resumes(workdir: str, method: str) -> None:
    quickstart = f"--config=configs/{method}.py:quickstart"
    config = f"{quickstart},total_steps=3,image_every_steps=2{SHRINK[method]}"
    small = ["--config.batch_size=8", "--config.log_every_steps=1"]
    first = _run(config, *small, workdir=workdir, env=USER_ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not _startup_noise(first.stderr), _startup_noise(first.stderr)
    assert "step 3/3" in first.stderr
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert os.path.exists(os.path.join(workdir, "reconstructions", "step_00000002.png"))
    assert os.path.exists(os.path.join(workdir, "checkpoints", "3", "default"))
    assert os.path.exists(os.path.join(workdir, "config.json"))

    longer = f"{quickstart},total_steps=4,image_every_steps=2{SHRINK[method]}"
    second = _run(longer, *small, workdir=workdir, env=USER_ENV)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not _startup_noise(second.stderr), _startup_noise(second.stderr)
    assert "restored checkpoint step 3" in second.stderr
    assert "step 4/4" in second.stderr
    assert os.path.exists(os.path.join(workdir, "checkpoints", "4", "default"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """The SimMIM quickstart, shortened, run and resumed once for every test here."""
    workdir = str(tmp_path_factory.mktemp("simmim") / "run")
    _quickstart_trains_writes_and_resumes(workdir, "simmim")
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in SHRINK if m != "simmim"])
def test_quickstart_trains_writes_and_resumes(tmp_path, method):
    _quickstart_trains_writes_and_resumes(str(tmp_path / "run"), method)


def _results(workdir: str) -> dict:
    with open(os.path.join(workdir, "eval_results.json")) as f:
        return json.load(f)


def _ok(result: subprocess.CompletedProcess) -> str:
    fatal = result.stderr.find("Fatal Python error")  # A crash: show where it started.
    assert result.returncode == 0, result.stderr[fatal : fatal + 4000] + result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_pretrain_then_finetune_evaluate_and_export(pretrained, tmp_path):
    """The README chain with no flags beyond init_from (shortened): every job writes its
    metrics; evaluating twice gives identical JSON; an exported file evaluates the same."""
    ft = str(tmp_path / "ft")
    log = _ok(
        _run(
            "--config=configs/finetune.py:quickstart,total_steps=4,log_every_steps=2",
            "--config.eval.every_steps=2",
            "--config.batch_size=8",
            f"--config.init_from={pretrained}",
            workdir=ft,
            env=ONE_DEVICE,
        )
    )
    assert "init_from checkpoint" in log and "new 2 (head.bias, head.kernel)" in log
    assert set(_results(ft)) == {"top1", "top5", "best_top1"}
    assert glob.glob(os.path.join(ft, "checkpoints_best", "*", "default"))

    for kind, keys in (("knn", {"knn_top1", "knn_top5"}), ("linear_probe", None)):
        workdir = str(tmp_path / kind)
        flags = (f"--config=configs/evaluate.py:{kind}", f"--config.init_from={pretrained}")
        _ok(_run(*flags, workdir=workdir, env=ONE_DEVICE))
        results = _results(workdir)
        assert set(results) == (keys or {"linear_probe_top1", "linear_probe_top5"})
        if kind == "knn":  # The same checkpoint evaluated again, elsewhere: identical JSON.
            _ok(_run(*flags, workdir=workdir + "_again", env=ONE_DEVICE))
            first, second = (
                pathlib.Path(w, "eval_results.json").read_text()
                for w in (workdir, workdir + "_again")
            )
            assert first == second

    top1 = str(tmp_path / "top1")
    top1_flags = ("--config=configs/evaluate.py:top1", f"--config.init_from={ft}")
    _ok(_run(*top1_flags, workdir=top1, env=ONE_DEVICE))
    assert set(_results(top1)) == {"top1", "top5"}
    exported = str(tmp_path / "ft.safetensors")
    _ok(_run(f"--init_from={ft}", f"--out={exported}", workdir="", module="mim_jax.export"))
    again = str(tmp_path / "top1_exported")
    _ok(_run(top1_flags[0], f"--config.init_from={exported}", workdir=again, env=ONE_DEVICE))
    assert _results(again) == _results(top1)
