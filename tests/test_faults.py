"""Faults a pod job meets, run through the real CLI on the tiny configs: SIGKILL at random steps
(between checkpoints and during an async save), SIGTERM (checkpoint at the signalled step, exit
0), a second signal (immediate exit), then resume: the loss log and the final parameters equal
an uninterrupted run's, for SimMIM, GreenMIM and iTPN (its EMA teacher included), with drop path
on. Also: a restore onto a smaller mesh, a partial checkpoint left by a crash, storage errors
during a save, and the non-finite policy (`skip` / `stop`)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import ROOT, tiny_simmim_config

from mim_jax import checkpoint, nonfinite, train
from mim_jax.data import sources

STEPS = 20
EVERY = 4  # Periodic checkpoints at 4, 8, ..., 20.
FLAGS = (
    f"--config.total_steps={STEPS}",
    f"--config.checkpoint_every_steps={EVERY}",
    "--config.async_checkpointing=true",
    "--config.keep_checkpoints=20",
    "--config.model.drop_path_rate=0.1",
)


def _env(devices: int) -> dict:
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return {**os.environ, "XLA_FLAGS": flags}


def _start(method: str, workdir, *flags: str, devices: int = 1) -> subprocess.Popen:
    """The CLI on `tests/tiny_config.py:<method>`, stderr piped line by line."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mim_jax.main",
            f"--config=tests/tiny_config.py:{method}",
            f"--workdir={workdir}",
            *FLAGS,
            *flags,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(devices),
    )


def _read_until(proc: subprocess.Popen, pattern: str) -> str:
    """Reads stderr until a line matches `pattern`; returns the lines read."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    proc.wait()
    raise AssertionError(f"exited ({proc.returncode}) before /{pattern}/:\n{''.join(seen)[-3000:]}")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out = proc.stderr.read()
    return proc.wait(timeout=600), out


def _run(method: str, workdir, *flags: str, devices: int = 1) -> str:
    code, out = _finish(_start(method, workdir, *flags, devices=devices))
    assert code == 0, out[-3000:]
    return out


def _kill_at(method: str, workdir, pattern: str) -> str:
    proc = _start(method, workdir)
    seen = _read_until(proc, pattern)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return seen


def _losses(workdir) -> dict[int, list[float]]:
    """Every logged `loss` scalar in the TensorBoard events of `workdir`, by step."""
    import tensorflow as tf

    found: dict[int, list[float]] = {}
    for name in sorted(os.listdir(workdir)):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                for value in event.summary.value:
                    if value.tag == "loss":
                        loss = float(tf.make_ndarray(value.tensor))
                        found.setdefault(event.step, []).append(loss)
    return found


def _saved_state(workdir, step: int) -> list[np.ndarray]:
    """The leaves of checkpoint `step` (parameters, optimizer state, teacher), as numpy."""
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    return [np.asarray(x) for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(path))]


@pytest.fixture(scope="module", params=["simmim", "greenmim", "itpn"])
def straight(request, tmp_path_factory):
    """An uninterrupted run of the method: (method, workdir)."""
    workdir = tmp_path_factory.mktemp(request.param) / "straight"
    _run(request.param, workdir)
    return request.param, workdir


def _committed(workdir) -> list[int]:
    """Checkpoint steps committed in `workdir` (orbax renames a save's directory on commit)."""
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def _resumed_from(out: str) -> int:
    found = re.search(r"restored checkpoint step (\d+) ", out)
    return int(found.group(1)) if found else 0


@pytest.mark.slow
def test_kills_and_sigterm_resume_exactly(straight, tmp_path):
    """Each restart resumes from the newest committed checkpoint (a save killed midway is
    ignored); the SIGTERM run saves where it stopped and exits 0."""
    method, reference = straight
    rng = np.random.default_rng(["simmim", "greenmim", "itpn"].index(method))
    workdir = tmp_path / "run"
    kills = (
        rf"step {rng.integers(5, 8)}/{STEPS} ",
        "saving checkpoint for step 8 ",  # Killed during that async save.
        rf"step {rng.integers(9, 12)}/{STEPS} ",
    )
    committed, partial_seen = [0], False
    for pattern in kills:
        assert _resumed_from(_kill_at(method, workdir, pattern)) == committed[-1]
        partial_seen |= any("tmp" in n for n in os.listdir(workdir / "checkpoints"))
        committed = [0, *_committed(workdir)]
    assert partial_seen  # At least one kill hit a save before its commit.
    proc = _start(method, workdir)
    assert _resumed_from(_read_until(proc, rf"step {rng.integers(13, 16)}/{STEPS} ")) == max(
        committed
    )
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 0, out[-3000:]
    saved = int(re.search(r"SIGTERM: saved checkpoint step (\d+) ", out).group(1))
    assert saved < STEPS and _committed(workdir)[-1] == saved
    assert _resumed_from(_run(method, workdir)) == saved

    expected = _losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    for step, losses in _losses(workdir).items():
        assert losses == [expected[step][0]] * len(losses), step
    for a, b in zip(_saved_state(reference, STEPS), _saved_state(workdir, STEPS), strict=True):
        np.testing.assert_array_equal(a, b)


def test_second_signal_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    proc = _start("simmim", workdir)
    _read_until(proc, r"step 14/20 ")  # Checkpoints 4 and 8 had time to commit.
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    code, out = _finish(proc)
    # Python runs both handlers at its next check, in signal-number order: either is second.
    second = re.search(r"(SIGINT|SIGTERM) again: exiting now", out)
    assert second and code == 128 + signal.Signals[second.group(1)], out[-3000:]
    committed = _committed(workdir)
    assert committed and committed[-1] >= 8
    assert _resumed_from(_run("simmim", workdir)) == committed[-1]


@pytest.mark.slow
def test_resume_on_a_smaller_mesh(tmp_path):
    """8 devices (fsdp=8) to a SIGTERM, then 4 devices (fsdp=4) to the end: the losses and
    the final parameters of the 8-device run within float32 reduction-order noise."""
    mesh = ("--config.mesh.data=1", "--config.mesh.fsdp=-1")
    _run("simmim", tmp_path / "straight", *mesh, devices=8)
    proc = _start("simmim", tmp_path / "moved", *mesh, devices=8)
    _read_until(proc, r"step 12/20 ")
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)[1]
    saved = int(re.search(r"SIGTERM: saved checkpoint step (\d+) ", out).group(1))
    assert _resumed_from(_run("simmim", tmp_path / "moved", *mesh, devices=4)) == saved
    expected, moved = _losses(tmp_path / "straight"), _losses(tmp_path / "moved")
    for step in range(saved + 1, STEPS + 1):
        np.testing.assert_allclose(moved[step][-1], expected[step][0], rtol=1e-5)
    straight, moved = (_saved_state(tmp_path / name, STEPS) for name in ("straight", "moved"))
    for a, b in zip(straight, moved, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _checkpointed_run(workdir, **overrides) -> None:
    config = tiny_simmim_config(total_steps=4, checkpoint_every_steps=2, **overrides)
    train.train(config, str(workdir))


def test_partial_checkpoint_of_a_crash_is_ignored(tmp_path):
    """A save killed before its commit leaves a temporary directory: never restored."""
    _checkpointed_run(tmp_path)
    ckpts = tmp_path / "checkpoints"
    partial = ckpts / "6.orbax-checkpoint-tmp-1796000000000000"
    shutil.copytree(ckpts / "4", partial)
    for root, _, files in os.walk(partial):
        for name in files:
            open(os.path.join(root, name), "w").close()  # Truncated to zero bytes.
    manager = checkpoint.Checkpointer(str(ckpts), max_to_keep=5)
    assert manager.latest_step() == 4
    manager.close()
    config = tiny_simmim_config(total_steps=6, checkpoint_every_steps=2)
    logged = train.train(config, str(tmp_path))
    assert sorted(logged) == [5, 6]


@pytest.mark.parametrize("when", ["save", "commit"])
def test_storage_error_is_one_line_and_keeps_older_checkpoints(tmp_path, monkeypatch, when):
    """Disk full while starting a save; permission denied at the background commit."""
    if when == "save":
        real_save = ocp.CheckpointManager.save

        def save(self, step, *args, **kwargs):
            if step == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    else:
        from orbax.checkpoint._src.path import async_path

        real_rename = async_path.rename

        async def rename(src, dst):
            if dst.name == "4":
                raise PermissionError(errno.EACCES, "Permission denied", str(dst))
            return await real_rename(src, dst)

        monkeypatch.setattr(async_path, "rename", rename)
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
        _checkpointed_run(tmp_path, async_checkpointing=when == "commit")
    message = str(e.value)
    assert "\n" not in message
    assert "cannot write" in message and "the last good checkpoint is step 2 in" in message
    assert ("No space left" if when == "save" else "Permission denied") in message
    monkeypatch.undo()
    manager = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=5)
    assert manager.latest_step() == 2
    manager.close()


def test_skip_policy_skips_the_poisoned_step_and_counts_it(tmp_path):
    config = tiny_simmim_config(
        total_steps=5,
        checkpoint_every_steps=1,
        keep_checkpoints=10,
        nonfinite="skip",
        poison_loss_step=3,
    )
    logged = train.train(config, str(tmp_path))
    assert [logged[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 0, 0]
    assert "loss" not in logged[3] and np.isfinite(logged[5]["loss"])
    before, after = _saved_state(tmp_path, 2), _saved_state(tmp_path, 3)
    changed = [not np.array_equal(a, b) for a, b in zip(before, after, strict=True)]
    assert changed.count(True) == 1  # Only the step counter moved over the skipped step.
    assert all(np.isfinite(x).all() for x in _saved_state(tmp_path, 5))


def test_skip_policy_stops_after_too_many_skips_in_a_row(tmp_path):
    config = tiny_simmim_config(nonfinite="skip", max_skipped_steps=1, poison_loss_step=2)
    with pytest.raises(nonfinite.NonFiniteLossError, match="1 steps in a row up to step 2"):
        train.train(config, str(tmp_path))


def test_stop_policy_names_the_step_and_the_last_good_checkpoint(tmp_path):
    config = tiny_simmim_config(total_steps=6, checkpoint_every_steps=2, poison_loss_step=3)
    with pytest.raises(nonfinite.NonFiniteLossError) as e:
        train.train(config, str(tmp_path))
    assert "non-finite loss (nan) at step 3" in str(e.value)
    assert "the last good checkpoint is step 2 in" in str(e.value)
    assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [2]
    assert all(np.isfinite(x).all() for x in _saved_state(tmp_path, 2))


def _folder_with_broken_files(root, good: int, broken: int):
    """`good` random 40 px PNGs and `broken` unreadable files of several kinds."""
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img_{i:03d}.png")
    kinds = (
        lambda path: path.write_bytes(b""),  # Zero bytes.
        lambda path: path.write_bytes((root / "img_000.png").read_bytes()[:200]),  # Truncated.
        lambda path: path.write_text("not an image"),
        lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8),  # Garbled.
    )
    for i in range(broken):
        kinds[i % len(kinds)](root / f"bad_{i:03d}.png")


@pytest.mark.parametrize("broken, fraction", [(2, 0.001), (12, 0.05)], ids=["some", "too_many"])
def test_broken_files_are_replaced_counted_or_stop_the_run(tmp_path, broken, fraction):
    """5% broken (2 of 40): the run completes and counts exactly the planted files; 12 of 40
    (over max(10, 5% of the files)): one line stops it."""
    folder = tmp_path / "images"
    _folder_with_broken_files(folder, 40 - broken, broken)
    config = tiny_simmim_config(total_steps=6, checkpoint_every_steps=3, log_every_steps=3)
    config.data.update(source="folder", folder=str(folder), max_bad_fraction=fraction)
    if broken > 10:
        with pytest.raises(sources.DataError, match="unreadable") as e:
            train.train(config, str(tmp_path / "run"))
        assert "\n" not in str(e.value)
        return
    logged = train.train(config, str(tmp_path / "run"))
    assert logged[6]["bad_examples"] == broken
    with open(tmp_path / "run" / "bad_examples.json") as f:
        paths = sorted(item["path"] for item in json.load(f)["bad"])
    assert paths == sorted(str(folder / f"bad_{i:03d}.png") for i in range(broken))
