"""mim_jax.plan on the CPU fallback (no libtpu in CI): topology names, the HLO collective
parser on hand-written HLO, per-device bytes against the parameter shapes and the fsdp rule,
the verdict, GreenMIM's group plans, and the command in a fresh process."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, tiny_greenmim_config, tiny_simmim_config
from jax._src import cloud_tpu_init
from jax.sharding import PartitionSpec

from mim_jax import plan, sharding
from mim_jax.methods import get_method

KEYS = (
    "topology",
    "backend",
    "devices",
    "mesh",
    "batch",
    "param_bytes",
    "opt_bytes",
    "temp_bytes",
    "total_bytes",
    "hbm_bytes",
    "fits",
    "flops",
    "collective_bytes",
    "note",
)


@pytest.mark.parametrize(
    ("text", "name", "chips", "tpu_name", "chip_config"),
    [
        ("v5p:4x4x4", "v5p:4x4x4", 64, "v5:4x4x4", "megacore"),
        ("v4:2x2", "v4:2x2x1", 4, "v4:2x2x1", "megacore"),
        ("v5litepod:16x16", "v5e:16x16", 256, "v5e:16x16", "default"),
        ("v6e:2x4x1", "v6e:2x4", 8, "v6e:2x4", "default"),
    ],
)
def test_parse_topology(text, name, chips, tpu_name, chip_config):
    topology = plan.parse_topology(text)
    assert (topology.name, topology.num_chips) == (name, chips)
    kwargs = topology.tpu_kwargs()
    assert (kwargs["topology_name"], kwargs["chip_config_name"]) == (tpu_name, chip_config)


@pytest.mark.parametrize("text", ["v5p", "v3:2x2", "v5e:2x2x2", "v4:0x2", "v6e:2by2"])
def test_parse_topology_rejects(text):
    with pytest.raises(plan.PlanError, match="--topology"):
        plan.parse_topology(text)


HLO = """\
HloModule jit_step, entry_computation_layout={...}

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%all-reduce-scatter.3 (input: f32[1024,64]) -> f32[256,64] {
  %all-reduce.9 = f32[1024,64]{1,0:T(8,128)} all-reduce(%input), to_apply=%add
  ROOT %slice = f32[256,64]{1,0} dynamic-slice(%all-reduce.9, %i, %j)
}

ENTRY %main (p: f32[8,16]) -> f32[8,16] {
  %ag = bf16[64,32]{1,0:T(8,128)(2,1)} all-gather(%p), dimensions={0}
  %ags = (f32[2,3]{1,0}, f32[8,3]{1,0}) all-gather-start(%q), dimensions={0}
  %agd = f32[8,3]{1,0} all-gather-done(%ags)
  %ar = (f32[10]{0}, s32[4]{0}) all-reduce(%a, %b), to_apply=%add
  %rs = f32[256,64]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.3
  %a2a = f32[4,4]{1,0} all-to-all(%c), dimensions={0}
  %cps = (f32[5]{0}, f32[5]{0}, u32[], u32[]) collective-permute-start(%d)
  ROOT %cpd = pred[16]{0} collective-permute-done(%cps)
}
"""


def test_collective_bytes_of_hand_written_hlo():
    assert plan.collective_bytes(HLO) == {
        "all-reduce": 10 * 4 + 4 * 4,  # The tuple's arrays; not the fused one.
        "all-gather": 64 * 32 * 2 + 8 * 3 * 4,  # bf16 + the done half only.
        "reduce-scatter": 256 * 64 * 4,  # The all-reduce-scatter fusion's result.
        "all-to-all": 4 * 4 * 4,
        "collective-permute": 16,  # pred: one byte each.
    }


def test_without_libtpu_auto_falls_back_and_tpu_says_what_to_install(monkeypatch):
    monkeypatch.setattr(cloud_tpu_init, "get_tpu_library_path", lambda: None)
    topology = plan.parse_topology("v5e:2x2")
    devices, backend, note = plan.plan_devices(topology, "auto")
    assert (len(devices), devices[0].platform, backend) == (4, "cpu", "cpu-fallback")
    assert 'pip install "jax[tpu]==' in note
    with pytest.raises(plan.PlanError, match=r'pip install "jax\[tpu\]=='):
        plan.plan_devices(topology, "tpu")


def _expected_param_bytes(config, fsdp: int) -> int:
    """Bytes per device from the shapes: a parameter with an 'embed' dimension divisible by
    fsdp is split fsdp ways (DEFAULT_SHARDING_RULES, tensor = 1), the rest replicated."""
    model = nnx.eval_shape(lambda: get_method(config.method).build_model(config, nnx.Rngs(0)))
    _, params = nnx.split(model, nnx.Param)
    specs = jax.tree.leaves(
        nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    total = 0
    for leaf, names in zip(jax.tree.leaves(params), specs, strict=True):
        split = any(n == "embed" and d % fsdp == 0 for n, d in zip(names, leaf.shape, strict=False))
        total += math.prod(leaf.shape) * 4 // (fsdp if split else 1)
    return total


@pytest.fixture(scope="module")
def simmim_plans() -> dict[int, dict]:
    """Tiny SimMIM planned for 8 chips on the CPU fallback, fsdp = 1 and 8."""
    plans = {}
    for fsdp, hbm_gib in ((1, 0.0), (8, 1e-5)):
        config = tiny_simmim_config()
        config.mesh.update(data=-1, fsdp=fsdp)
        plans[fsdp] = plan.plan(config, "v5e:2x4", backend="cpu", hbm_gib=hbm_gib, label="tiny")
    return plans


def test_plan_keys_and_positive_costs(simmim_plans):
    for fsdp, record in simmim_plans.items():
        assert set(KEYS) <= set(record), set(KEYS) - set(record)
        json.dumps(record)
        assert record["backend"] == "cpu-fallback" and record["devices"] == 8
        assert record["mesh"] == {"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1}
        assert record["temp_bytes"] > 0 and record["flops"] > 0
        assert record["total_bytes"] >= record["param_bytes"] + record["opt_bytes"]


def test_param_bytes_shrink_by_the_fsdp_factor(simmim_plans):
    config = tiny_simmim_config()
    for fsdp, record in simmim_plans.items():
        assert record["param_bytes"] == _expected_param_bytes(config, fsdp)
        # AdamW: two float32 moments per parameter, plus a few scalar counts.
        assert 0 <= record["opt_bytes"] - 2 * record["param_bytes"] < 64
    # Norms, biases and position tables stay replicated: ~6x here, not 8x.
    assert simmim_plans[1]["param_bytes"] / simmim_plans[8]["param_bytes"] > 5


def test_verdict_against_the_hbm(simmim_plans):
    large, small = simmim_plans[1], simmim_plans[8]
    assert large["hbm_bytes"] == 16 * 2**30 and large["fits"]  # v5e's HBM.
    assert "fits in 16 GiB HBM" in plan.format_table(large)
    assert small["hbm_bytes"] == int(1e-5 * 2**30) and not small["fits"]
    assert "does NOT fit in" in plan.format_table(small)


def test_fsdp_mesh_gathers_parameters(simmim_plans):
    gathered = simmim_plans[8]["collective_bytes"]
    assert gathered["all-gather"] > 0
    # A data-parallel mesh sums gradients and never gathers a parameter shard.
    assert simmim_plans[1]["collective_bytes"]["all-reduce"] > 0


def test_greenmim_plans_with_mask_groups():
    config = tiny_greenmim_config(**{"mask.groups": 4})
    config.mesh.update(data=2, fsdp=4)
    record = plan.plan(config, "v5e:2x4", backend="cpu")
    assert record["method"] == "greenmim" and record["batch_per_device"] == 2
    assert record["fits"] and record["temp_bytes"] > 0 and record["flops"] > 0


@pytest.mark.parametrize(
    ("make_config", "groups"),
    [(tiny_simmim_config, 0), (tiny_greenmim_config, 8), (tiny_greenmim_config, 4)],
)
def test_abstract_batch_matches_the_train_loops_placed_batch(make_config, groups):
    """Shapes, dtypes and shardings equal what sharding.global_batch makes of a real host
    batch (GreenMIM: 8 groups split over data x fsdp, 4 groups replicated)."""
    config = make_config(**({"mask.groups": groups} if groups else {}))
    config.mesh.update(data=2, fsdp=4)
    mesh = sharding.make_mesh(config.mesh)
    method = get_method(config.method)
    size, batch = config.model.img_size, config.batch_size
    host = {
        "image": np.zeros((batch, size, size, 3), np.float32),
        "label": np.zeros((batch,), np.int32),
        "index": np.arange(batch),
    }
    host = method.make_batch_transform(config, mesh)(host, 0)
    del host["index"]
    group_keys = getattr(method, "GROUP_KEYS", ())
    num_groups = method.num_mask_groups(config, mesh) if group_keys else 1
    placed = sharding.global_batch(host, mesh, group_keys=group_keys, num_groups=num_groups)
    abstract = plan.abstract_batch(config, mesh, method)
    describe = lambda x: (x.shape, x.dtype, x.sharding.spec)
    assert jax.tree.map(describe, abstract) == jax.tree.map(describe, placed)
    if groups:
        assert {x.shape[0] for x in jax.tree.leaves(abstract["plans"])} == {groups}


TINY = (
    ":quickstart,model.img_size=32,model.patch_size=4,model.embed_dim=16,model.window_size=4,"
    "mask.patch_size=16"
)


def test_command_forces_the_topology_device_count():
    """A fresh process plans 4 chips although the tests run with 8 devices: one JSON line on
    stdout, the table and the fallback's install hint on stderr."""
    env = {**os.environ, "XLA_FLAGS": ""}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mim_jax.plan",
            f"--config=configs/simmim.py{TINY}",
            "--config.model.depths=(2,2)",
            "--config.model.num_heads=(2,4)",
            "--topology=v5e:2x2",
            "--backend=cpu",
            "--batch=8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["devices"] == 4 and record["mesh"]["data"] == 4
    assert record["config"].startswith("configs/simmim.py:quickstart")
    assert "verdict: fits in 16 GiB HBM" in result.stderr
    assert 'pip install "jax[tpu]==' in result.stderr


def test_xla_options_reach_the_compiler():
    """--xla_option values go to this compile: an option XLA:CPU lacks fails as one PlanError
    naming it; one it has is compiled with and recorded."""
    parsed = plan.parse_xla_options(["--a=1", "b = x", "c=False", "d=0.5"])
    assert parsed == {"a": 1, "b": "x", "c": False, "d": 0.5}
    for bad in ("a", "=1"):
        with pytest.raises(plan.PlanError, match="must be NAME=VALUE"):
            plan.parse_xla_options([bad])
    config = tiny_simmim_config()
    option = "xla_tpu_scheduler_percent_shared_memory_limit"
    with pytest.raises(plan.PlanError, match=f"rejects an --xla_option.*{option}"):
        plan.plan(config, "v5e:2x4", backend="cpu", compiler_options={option: "10"})
    with pytest.raises(plan.PlanError, match="xla_cpu_enable_fast_math"):
        plan.plan(
            config, "v5e:2x4", backend="cpu", compiler_options={"xla_cpu_enable_fast_math": 3}
        )
    options = {"xla_cpu_enable_fast_math": False}
    record = plan.plan(config, "v5e:2x4", backend="cpu", compiler_options=options)
    assert record["compiler_options"] == options


# libtpu 0.0.42.1's message for ViT-B/16 at 512 images per v5e chip; the second form is
# XLA:TPU's other wording.
OOM_TEMP = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (34.05G) exceeds available HBM (15.75G)."
)
OOM_USED = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of 15.48G hbm."


def test_out_of_memory_messages():
    assert plan.out_of_memory(OOM_TEMP) == {"temp_bytes": int(34.05 * 2**30), "total_bytes": None}
    assert plan.out_of_memory(OOM_USED) == {"temp_bytes": None, "total_bytes": int(20.5 * 2**30)}
    assert plan.out_of_memory("RESOURCE_EXHAUSTED: something else") == {
        "temp_bytes": None,
        "total_bytes": None,
    }


@pytest.mark.parametrize("message", [OOM_TEMP, OOM_USED, "RESOURCE_EXHAUSTED: other"])
def test_a_step_the_compiler_cannot_fit_is_a_does_not_fit_record(monkeypatch, message):
    """The TPU compiler refuses a step over HBM: the plan still prints a record, fits false,
    with the sizes the message states, instead of a traceback."""
    monkeypatch.setattr(plan, "_compile", lambda lowered, options, backend: (None, message))
    record = plan.plan(tiny_simmim_config(), "v5e:2x4", backend="cpu")
    json.dumps(record)
    assert record["fits"] is False and record["out_of_memory"] == message
    assert record["flops"] is None and record["collective_bytes"] == {}
    args = record["argument_bytes"]
    assert args > record["param_bytes"] + record["opt_bytes"]  # The batch is an argument too.
    expected = {
        OOM_TEMP: args + int(34.05 * 2**30),
        OOM_USED: int(20.5 * 2**30),
    }.get(message)
    assert record["total_bytes"] == expected
    table = plan.format_table(record)
    assert "does NOT fit in 16 GiB HBM" in table and "out of memory" in table
    assert "TFLOPs per step" in table and "?" in table
