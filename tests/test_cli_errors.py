"""Bad configs and bad command lines through the real CLI (`python -m mim_jax.main`, one case of
`mim_jax.plan`): each exits nonzero with ONE line on stderr, `mim_jax: error: <message>`, no
traceback and no library start-up chatter; a bug in a config file keeps its traceback.

Every case fails before a train step is compiled (the two init_from cases compile the model's
init first, where train/evaluate resolve init_from); the subprocesses run 4 at a time, all
started by one module fixture.
"""

import concurrent.futures
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest
from helpers import ROOT

# What a user's shell has: no TensorFlow or JAX settings (conftest sets some for the tests), so
# the CLI's own quieting is what is tested. One CPU device unless a case asks for more.
USER_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "JAX_PLATFORMS")
}
QUICKSTART = "--config=configs/simmim.py:quickstart"
VARIANTS = "swin_base_192, swin_base_192_800ep, swin_large_192_800ep, vit_base_224, quickstart"
# train.train and evaluate.run log the mesh (our own progress line) before checking the batch
# split, the data folder and init_from; a case with `after_mesh` may show it first.
MESH_LINE = re.compile(r"^I\d{4} [\d:.]+ +\d+ sharding\.py:\d+\] mesh: data=\d+, fsdp=\d+, ")


@dataclasses.dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    message: str  # Exact text the error line must contain.
    workdir: bool = True
    devices: int = 1
    after_mesh: bool = False
    module: str = "mim_jax.main"
    program: str = "mim_jax"


def _case(*args: str, **kwargs) -> Case:
    return Case(args, **kwargs)


CASES = {
    # The mesh, the data and init_from, against this machine, and mim_jax.plan: these load the
    # libraries (seconds), so they come first.
    "missing_init_from": _case(
        "--config=configs/finetune.py:quickstart",
        "--config.init_from=/nonexistent/run",
        message="config.init_from='/nonexistent/run' is neither a workdir with checkpoints",
        after_mesh=True,
    ),
    "weights_of_another_model": _case(
        "--config=configs/evaluate.py:knn",
        "--config.init_from=tests/fixtures/itpn_tiny_state.npz",
        message="does not fit the model: encoder.layers.0.blocks.0.attn.proj.bias missing",
        after_mesh=True,
    ),
    "mesh_needs_more_devices": _case(
        QUICKSTART,
        "--config.mesh.data=2",
        message="config.mesh: data*fsdp*tensor = 2 but there are 1 devices",
    ),
    "batch_does_not_split": _case(
        QUICKSTART,
        "--config.batch_size=3",
        message="config.batch_size=3 must be divisible by data*fsdp=2",
        devices=2,
        after_mesh=True,
    ),
    "missing_data_dir": _case(
        QUICKSTART,
        "--config.data.source=folder",
        "--config.data.folder=/nonexistent/images",
        message="config.data.folder='/nonexistent/images' is not a directory",
        after_mesh=True,
    ),
    "plan_bad_topology": _case(
        QUICKSTART,
        "--topology=v9:4x4",
        message="--topology='v9:4x4': expected GENERATION:AxB[xC] with GENERATION one of "
        "v4, v5p, v5e, v6e, v5litepod",
        workdir=False,
        module="mim_jax.plan",
        program="mim_jax.plan",
    ),
    # The command line itself: flags, the config file, its variant and overrides.
    "bad_variant": _case(
        "--config=configs/simmim.py:quikstart",
        message=f"unknown config variant 'quikstart'; choose one of: {VARIANTS}",
    ),
    "misspelled_key": _case(
        QUICKSTART,
        "--config.batchsize=3",
        message="--config.batchsize=3: unknown config key 'batchsize'. "
        'Did you mean "batch_size" instead of "batchsize"?',
    ),
    "misspelled_nested_key": _case(
        QUICKSTART,
        "--config.maskk.ratio=0.5",
        message="--config.maskk.ratio=0.5: unknown config key 'maskk'. "
        'Did you mean "mask" instead of "maskk"?',
    ),
    "bad_value_type": _case(
        QUICKSTART,
        "--config.batch_size=abc",
        message="flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'",
    ),
    "bad_value_in_config_arg": _case(
        f"{QUICKSTART},batch_size=x", message="config key 'batch_size': cannot parse 'x' as int"
    ),
    "unknown_key_in_config_arg": _case(
        f"{QUICKSTART},batchsize=2",
        message="unknown config key 'batchsize' (did you mean 'batch_size'?)",
    ),
    "missing_workdir": _case(QUICKSTART, message="missing required flag --workdir", workdir=False),
    "missing_config": _case(message="missing required flag --config"),
    "nonexistent_config_file": _case(
        "--config=configs/nope.py:quickstart",
        message="cannot load the config file (--config): [Errno 2] No such file or directory: "
        "'configs/nope.py'",
    ),
    "extra_positional_arg": _case(QUICKSTART, "extra", message="unexpected arguments: extra"),
    "unknown_flag": _case(
        QUICKSTART,
        "--workdri=/tmp/x",
        message="Unknown command line flag 'workdri'. Did you mean: workdir ?",
    ),
    "library_flag_still_parsed": _case(  # grain's flag is defined once the libraries load.
        QUICKSTART,
        "--grain_py_debug_mode",
        "--config.batch_size=0",
        message="config.batch_size=0 must be > 0",
    ),
    # config_checks.validate: one line naming the field.
    "batch_size_zero": _case(
        QUICKSTART, "--config.batch_size=0", message="config.batch_size=0 must be > 0"
    ),
    "remat": _case(
        QUICKSTART,
        "--config.remat=sometimes",
        message="config.remat='sometimes' must be one of: none, full, dots",
    ),
    "accum_steps": _case(
        QUICKSTART,
        "--config.accum_steps=3",
        message="config.accum_steps=3 must be >= 1 and divide config.batch_size=32",
    ),
    "dcn_data": _case(
        QUICKSTART, "--config.mesh.dcn_data=0", message="config.mesh.dcn_data=0 must be >= 1"
    ),
    "mask_ratio": _case(
        QUICKSTART, "--config.mask.ratio=1.5", message="config.mask.ratio=1.5 must be in (0, 1)"
    ),
    "window_does_not_divide": _case(
        QUICKSTART,
        "--config.model.window_size=5",
        message="config.model.window_size=5 does not divide the stage-0 grid 12",
    ),
    "data_source": _case(
        QUICKSTART,
        "--config.data.source=s3",
        message="config.data.source='s3' must be one of: tfds, folder, bundled",
    ),
    "model_name": _case(
        QUICKSTART,
        "--config.model.name=resnet",
        message="config.model.name='resnet' must be swin, vit or itpn",
    ),
    "nonfinite": _case(
        QUICKSTART,
        "--config.nonfinite=ignore",
        message="config.nonfinite='ignore' must be one of: stop, skip",
    ),
    "max_skipped_steps": _case(
        QUICKSTART,
        "--config.max_skipped_steps=0",
        message="config.max_skipped_steps=0 must be >= 1",
    ),
    "max_bad_fraction": _case(
        QUICKSTART,
        "--config.data.max_bad_fraction=1.5",
        message="config.data.max_bad_fraction=1.5 must be in [0, 1]",
    ),
    "top1_without_checkpoint": _case(
        "--config=configs/evaluate.py:top1",
        message="config.init_from must name a fine-tuned checkpoint for eval.kind='top1'",
    ),
}

# Bugs in a config file (not command-line mistakes): get_config's body, and what the traceback
# must show.
BUGGY_CONFIGS = {
    "config_raises_value_error": ("raise ValueError('a bug in get_config')", "a bug in get_config"),
    "config_has_name_error": ("return undefined_name", "NameError: name 'undefined_name'"),
}


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=env
    )


def _command(case: Case, workdir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        case.module,
        *case.args,
        *([f"--workdir={workdir}"] if case.workdir else []),
    ]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> pathlib.Path:
    """Workdirs (one per case, named after it) and the buggy config files."""
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def results(tmp) -> dict[str, subprocess.CompletedProcess]:
    """Every case's (and buggy config's) finished subprocess, run 4 at a time."""
    jobs = {}
    for name, case in CASES.items():
        devices = f"--xla_force_host_platform_device_count={case.devices}" * (case.devices > 1)
        jobs[name] = (_command(case, str(tmp / name)), {**USER_ENV, "XLA_FLAGS": devices})
    for name, (body, _) in BUGGY_CONFIGS.items():
        config = tmp / f"{name}.py"
        config.write_text(f"def get_config(arg=None):\n    {body}\n")
        jobs[name] = (
            _command(_case(f"--config={config}", message=""), str(tmp / name)),
            {**USER_ENV, "XLA_FLAGS": ""},
        )
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run, *job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_error(results, tmp, name):
    case, result = CASES[name], results[name]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and lines, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    progress = lines[:-1]
    if case.after_mesh and progress and MESH_LINE.match(progress[0]):
        progress = progress[1:]
    assert progress == [], result.stderr[-3000:]
    assert lines[-1].startswith(f"{case.program}: error: "), lines[-1]
    assert case.message in lines[-1]
    assert not (tmp / name / "checkpoints" / "0").exists()


@pytest.mark.parametrize("name", list(BUGGY_CONFIGS))
def test_config_file_bug_keeps_its_traceback(results, name):
    result = results[name]
    assert result.returncode != 0
    assert "Traceback" in result.stderr, result.stderr[-3000:]
    assert BUGGY_CONFIGS[name][1] in result.stderr
    assert "mim_jax: error:" not in result.stderr
