r"""Deviceless AOT memory plans: compile the real train step for a TPU topology on any machine.

  python -m mim_jax.plan --config=configs/simmim.py:swin_base_192 --topology=v5p:4x4x4
  python -m mim_jax.plan --config=configs/greenmim.py:swin_large_224_win14 --topology=v4:4x4x2 \
      --config.mesh.fsdp=8 --batch=2048

Builds the train state abstractly (`train.setup`: shapes and shardings, nothing allocated), a
host-shaped abstract batch (the method's own batch transform run on example indices, so
GreenMIM's mask-group plans have their real shapes), and compiles the donated train step for a
mesh over the topology's devices. libtpu (`pip install "jax[tpu]==<jax version>"`) compiles
for TPUs without one; without it the plan falls back to as many forced CPU devices as the
topology has chips and says so (`"backend": "cpu-fallback"`: XLA:CPU's memory and FLOPs,
a rough guide only).

Prints one JSON line to stdout (per-device bytes: param_bytes, opt_bytes, temp_bytes,
total_bytes = argument + output - alias + temp, hbm_bytes, fits; flops; collective_bytes per
kind; docs/plan.md lists every key) and a table with the verdict to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Plans never run on (or wait for) an accelerator.
# Compile-only libtpu opens no TPU: plans may run beside each other (or beside a training job).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import dataclasses
import json
import math
import re
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import flags
from jax._src import cloud_tpu_init, xla_bridge
from jax.experimental import topologies
from ml_collections import config_flags

from mim_jax import cli, config_checks, config_lib, sharding, train
from mim_jax.models import backward

GIB = 1 << 30
TPU_INSTALL = f'pip install "jax[tpu]=={jax.__version__}"'


class PlanError(config_lib.ConfigError):
    """A topology, backend or mesh that cannot be planned; the message names it."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation as libtpu's topology names spell it."""

    prefix: str  # Generation in libtpu's topology name ('v5' is v5p).
    chip_config: str  # 'megacore': one device per chip of two TensorCores.
    hbm_gib: float
    dims: int  # Chip grid dimensions: 3 (torus) or 2.


CHIPS = {
    "v4": Chip("v4", "megacore", 32, 3),
    "v5p": Chip("v5", "megacore", 95, 3),
    "v5e": Chip("v5e", "default", 16, 2),
    "v6e": Chip("v6e", "default", 32, 2),
}
ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice of `grid` chips of one generation, e.g. v5p:4x4x4 (64 chips)."""

    generation: str
    grid: tuple[int, ...]

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def num_chips(self) -> int:
        return math.prod(self.grid)

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    def tpu_kwargs(self) -> dict:
        """Arguments of `jax.experimental.topologies.get_topology_desc` for this slice."""
        return dict(
            platform="tpu",
            topology_name=f"{self.chip.prefix}:{'x'.join(map(str, self.grid))}",
            chip_config_name=self.chip.chip_config,
            chips_per_host_bounds=(min(self.grid[0], 2), min(self.grid[1], 2), 1),
            num_slices=1,
        )


def parse_topology(text: str) -> Topology:
    """'v5p:4x4x4', 'v5e:16x16', 'v5litepod:2x2' or 'v4:2x2' (= 2x2x1) -> Topology."""
    generation, _, grid_text = text.partition(":")
    generation = ALIASES.get(generation, generation)
    if generation not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", grid_text):
        raise PlanError(
            f"--topology={text!r}: expected GENERATION:AxB[xC] with GENERATION one of "
            f"{', '.join([*CHIPS, *ALIASES])}, e.g. v5p:4x4x4 or v5e:16x16"
        )
    grid = tuple(int(g) for g in grid_text.split("x"))
    dims = CHIPS[generation].dims
    if dims == 3 and len(grid) == 2:
        grid = (*grid, 1)
    if len(grid) == 3 and dims == 2:
        if grid[2] != 1:
            raise PlanError(f"--topology={text!r}: {generation} slices are 2-D (AxB)")
        grid = grid[:2]
    if min(grid) < 1:
        raise PlanError(f"--topology={text!r}: every grid size must be positive")
    return Topology(generation, grid)


def cpu_devices(count: int) -> list[jax.Device]:
    """`count` CPU devices; forces that many when jax has not started its backends yet."""
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", count)
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise PlanError(
            f"the CPU fallback needs {count} devices but jax started with {len(devices)}; "
            f"plan in a fresh process or set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{count} before jax starts"
        )
    return devices[:count]


def tpu_devices(topology: Topology) -> list[jax.Device]:
    """Compile-only devices of `topology` from libtpu (no TPU needed)."""
    return list(topologies.get_topology_desc(**topology.tpu_kwargs()).devices)


def plan_devices(topology: Topology, backend: str = "auto") -> tuple[list[jax.Device], str, str]:
    """(devices, backend, note): libtpu's compile-only devices ('tpu'), else forced CPU devices
    ('cpu-fallback') with a note saying why and what to install."""
    if backend not in ("auto", "tpu", "cpu"):
        raise PlanError(f"--backend={backend!r}: expected auto, tpu or cpu")
    reason = "--backend=cpu"
    if backend != "cpu":
        if cloud_tpu_init.get_tpu_library_path() is None:
            reason = "libtpu is not installed"
        else:
            try:
                return tpu_devices(topology), "tpu", ""
            except (RuntimeError, ValueError) as e:
                reason = f"libtpu could not build {topology.name}: {e}"
        if backend == "tpu":
            raise PlanError(f"{reason}; to plan for TPUs: {TPU_INSTALL}")
    note = (
        f"{reason}: planned on {topology.num_chips} forced CPU devices (XLA:CPU memory and "
        f"FLOPs, not the TPU's); to plan for TPUs: {TPU_INSTALL}"
    )
    return cpu_devices(topology.num_chips), "cpu-fallback", note


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, method) -> dict:
    """The global batch the step receives, as ShapeDtypeStructs placed as by
    `sharding.global_batch`: 'image' float32 `[B, H, W, C]`, 'label' `[B]` and the fields the
    method's batch transform adds (run on all B example indices, so GreenMIM's per-group plans
    have their real shapes)."""
    size, batch = config.model.img_size, config.batch_size
    image = np.broadcast_to(np.float32(0), (batch, size, size, config.model.in_chans))  # No copy.
    host = {"image": image, "label": np.zeros((batch,), np.int32), "index": np.arange(batch)}
    host = method.make_batch_transform(config, mesh)(host, 0)
    group_keys = getattr(method, "GROUP_KEYS", ())
    groups = method.num_mask_groups(config, mesh) if group_keys else 1
    groups_placed = (
        sharding.batch_sharding
        if sharding.mask_groups_sharded(groups, mesh)
        else lambda m, ndim: sharding.replicated(m)
    )

    def spec(leaf, placement) -> jax.ShapeDtypeStruct:
        leaf = np.asarray(leaf)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement(mesh, leaf.ndim))

    out = {}
    for key, value in host.items():
        if key not in train.HOST_ONLY_KEYS:
            placement = groups_placed if key in group_keys else sharding.batch_sharding
            out[key] = jax.tree.map(lambda x, p=placement: spec(x, p), value)
    return out


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (its largest shard)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BITS = {"pred": 8, "token": 0, "s4": 4, "u4": 4, "f4e2m1fn": 4}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s+=\s+(.*?)\s([a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_REDUCE_SCATTER_FUSION = re.compile(r"calls=%?all-reduce-scatter")


def _shape_bytes(type_text: str) -> int:
    """Bytes of the arrays in an HLO result type, e.g. '(f32[8,4]{1,0}, bf16[2])' -> 132."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        bits = _DTYPE_BITS[dtype] if dtype in _DTYPE_BITS else int(re.findall(r"\d+", dtype)[0])
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{kind: bytes} of the results of each collective kind in optimized HLO text.

    Synchronous ops and the '-done' half of asynchronous ones count (the '-start' half holds
    the operand too); TPU's reduce-scatter fusion (an all-reduce and a slice fused as
    'all-reduce-scatter') counts as a reduce-scatter of its result, its inside not again.
    """
    out = dict.fromkeys(COLLECTIVES, 0)
    inside_fusion = False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # A computation header (or its closing brace).
            inside_fusion = line.lstrip("%").startswith("all-reduce-scatter")
            continue
        match = _INSTRUCTION.match(line)
        if inside_fusion or match is None:
            continue
        type_text, opcode = match.groups()
        if opcode == "fusion" and _REDUCE_SCATTER_FUSION.search(line):
            out["reduce-scatter"] += _shape_bytes(type_text)
        elif opcode.removesuffix("-done") in COLLECTIVES and not opcode.endswith("-start"):
            out[opcode.removesuffix("-done")] += _shape_bytes(type_text)
    return out


def _memory(compiled) -> dict[str, int]:
    """Per-device buffer sizes of the executable (0 where the backend does not say)."""
    stats = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp")
    return {f"{f}_bytes": int(getattr(stats, f"{f}_size_in_bytes", 0) or 0) for f in fields}


def _costs(compiled) -> dict[str, float]:
    costs = compiled.cost_analysis()
    if isinstance(costs, list | tuple):  # Older jax: one dict per program.
        costs = costs[0] if costs else {}
    return {"flops": costs.get("flops", 0.0), "bytes_accessed": costs.get("bytes accessed", 0.0)}


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# XLA:TPU's out-of-memory messages: "the total memory required for HLO temporaries (34.05G)
# exceeds available HBM (15.75G)" or "Used 20.51G of 15.48G hbm".
_OOM_TEMP = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT]?)\)")
_OOM_USED = re.compile(r"Used ([0-9.]+)([KMGT]?) of [0-9.]+[KMGT]? hbm")


def out_of_memory(message: str) -> dict[str, int | None]:
    """The sizes an XLA:TPU RESOURCE_EXHAUSTED compile error states: temp_bytes (HLO
    temporaries) or total_bytes (all of HBM used); None where the message does not say."""
    temp = _OOM_TEMP.search(message)
    used = _OOM_USED.search(message)
    return {
        "temp_bytes": int(float(temp[1]) * _UNITS[temp[2]]) if temp else None,
        "total_bytes": int(float(used[1]) * _UNITS[used[2]]) if used else None,
    }


def _compile(lowered, options: dict | None, backend: str):
    """The executable, or the compiler's RESOURCE_EXHAUSTED message (the step does not fit)."""
    try:
        return lowered.compile(options), None
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text:
            return None, text.splitlines()[0]
        if "compile option" in text or "setting option" in text:
            raise PlanError(f"the {backend} compiler rejects an --xla_option: {text}") from None
        raise


def _executable_stats(compiled, arguments: int, oom: str | None) -> dict[str, object]:
    """Memory, total, costs and collectives of `compiled`; from the compiler's message, and
    `arguments` (the state and batch bytes), when it ran out of memory."""
    if compiled is None:
        sizes = out_of_memory(oom)
        temp, total = sizes["temp_bytes"], sizes["total_bytes"]
        if total is None and temp is not None:
            total = arguments + temp
        return {
            "argument_bytes": arguments,
            "output_bytes": 0,
            "alias_bytes": 0,
            "temp_bytes": temp,
            "total_bytes": total,
            "flops": None,
            "bytes_accessed": None,
            "collective_bytes": {},
        }
    memory = _memory(compiled)
    total = memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
    return {
        **memory,
        "total_bytes": total + memory["temp_bytes"],
        **_costs(compiled),
        "collective_bytes": collective_bytes(compiled.as_text()),
    }


def plan(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    backend: str = "auto",
    hbm_gib: float = 0.0,
    num_examples: int = 1_281_167,
    label: str = "",
    compiler_options: dict[str, bool | int | float | str] | None = None,
) -> dict[str, object]:
    """Compiles the train step of `config` for `topology` and returns the plan's record
    (module docstring). `hbm_gib` > 0 replaces the chip's HBM; `num_examples` sets the
    schedule's length (it does not change memory); `label` names the config in the record;
    `compiler_options` are XLA options for this compile (e.g. the TPU scheduler's memory
    limit, docs/plan.md), recorded as given. A step the TPU compiler cannot fit in HBM is a
    record too: `fits` false, the sizes its message states, `out_of_memory` that message."""
    topo = parse_topology(topology)
    config_checks.validate(config)
    devices, used, note = plan_devices(topo, backend)
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_size(config.batch_size, mesh)
    s = train.setup(config, mesh, num_examples)
    batch = abstract_batch(config, mesh, s.method)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled, oom = _compile(
            s.train_step.lower(s.abstract_state, batch), compiler_options, used
        )
    compile_s = time.perf_counter() - start
    state = s.abstract_state
    stats = _executable_stats(compiled, per_device_bytes((state, batch)), oom)
    hbm = int((hbm_gib or topo.chip.hbm_gib) * GIB)
    teacher_bytes = per_device_bytes(state.teacher) if state.teacher is not None else 0
    return {
        "config": label,
        "method": config.method,
        "topology": topo.name,
        "backend": used,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "mesh": {axis: int(mesh.shape[axis]) for axis in sharding.MESH_AXES},
        "batch": config.batch_size,
        "batch_per_device": config.batch_size // sharding.batch_shards(mesh),
        "dtype": config.dtype,
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "param_bytes": per_device_bytes(state.params),
        "opt_bytes": per_device_bytes(state.opt_state) + teacher_bytes,
        "teacher_bytes": teacher_bytes,
        **stats,
        "hbm_bytes": hbm,
        "fits": oom is None and stats["total_bytes"] <= hbm,
        "out_of_memory": oom,
        "compile_s": round(compile_s, 1),
        "autodiff": sorted(backward.autodiff_names()),
        "compiler_options": dict(compiler_options or {}),
        "jax": jax.__version__,
        "note": note,
    }


def verdict(record: dict) -> str:
    """'fits in 16 GiB HBM (2.64 GiB, 17% used)' or 'does NOT fit in 16 GiB HBM (needs ...)'."""
    hbm, total = record["hbm_bytes"] / GIB, record["total_bytes"]
    if record["fits"]:
        return (
            f"fits in {hbm:g} GiB HBM ({total / GIB:.2f} GiB, {100 * total / GIB / hbm:.0f}% used)"
        )
    if total is None:
        return f"does NOT fit in {hbm:g} GiB HBM (the compiler ran out of memory)"
    needs = f"needs {total / GIB:.2f} GiB, {total / GIB / hbm:.2f}x"
    if record.get("out_of_memory"):
        needs += "; the compiler ran out of memory"
    return f"does NOT fit in {hbm:g} GiB HBM ({needs})"


def _gib(size: int | None) -> str:
    return "?" if size is None else f"{size / GIB:.3f}"


def format_table(record: dict) -> str:
    """A readable summary of a plan's record, ending with its verdict ('?': a size the
    compiler did not report because it ran out of memory)."""
    mesh = " ".join(f"{k}={v}" for k, v in record["mesh"].items())
    rows = [
        ("parameters", record["param_bytes"]),
        ("optimizer + teacher", record["opt_bytes"]),
        ("arguments", record["argument_bytes"]),
        ("outputs - aliased", record["output_bytes"] - record["alias_bytes"]),
        ("temp", record["temp_bytes"]),
        ("total", record["total_bytes"]),
        ("HBM", record["hbm_bytes"]),
    ]
    collectives = ", ".join(
        f"{kind} {size / GIB:.3f}" for kind, size in record["collective_bytes"].items() if size
    )
    flops = "?" if record["flops"] is None else f"{record['flops'] / 1e12:.3f}"
    lines = [
        f"plan: {record['config'] or record['method']} on {record['topology']} "
        f"({record['devices']} x {record['device_kind']}, backend {record['backend']})",
        f"mesh {mesh}; batch {record['batch']} ({record['batch_per_device']} per data shard), "
        f"{record['dtype']}, {record['params'] / 1e6:.1f}M parameters",
        f"{'per device':<22}{'GiB':>10}",
        *(f"  {name:<20}{_gib(size):>10}" for name, size in rows),
        f"  {'TFLOPs per step':<20}{flops:>10}",
        f"  collectives (GiB)   {collectives or 'none'}",
        f"verdict: {verdict(record)}",
    ]
    for key in ("out_of_memory", "note"):
        if record.get(key):
            lines.append(f"{key.replace('_', ' ')}: {record[key]}")
    return "\n".join(lines)


FLAGS = flags.FLAGS
PROGRAM = "mim_jax.plan"


def define_flags() -> None:
    """The command line's flags (defined only when run as a program: mim_jax.main owns
    --config in a process that imports both)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file, optionally with ':variant[,key=value...]'.", lock_config=True
    )
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:4x4x4, v4:2x4x4, v5e:16x16.")
    flags.DEFINE_integer("batch", 0, "Global batch size; overrides config.batch_size when > 0.")
    flags.DEFINE_enum("backend", "auto", ["auto", "tpu", "cpu"], "auto: libtpu if installed.")
    flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip in GiB; 0 = the generation's.")
    flags.DEFINE_integer("num_examples", 1_281_167, "Data set size for the lr schedule.")
    flags.DEFINE_list(
        "autodiff",
        [],
        "Hand-written backwards to replace by autodiff (mim_jax/models/backward.py): 'all' or "
        "function names, to plan what they save.",
    )
    flags.DEFINE_multi_string(
        "xla_option",
        [],
        "NAME=VALUE: an XLA compiler option for this compile (repeatable), e.g. "
        "xla_tpu_scheduler_percent_shared_memory_limit=10 (docs/plan.md).",
    )


def _label() -> str:
    """The config file, variant and overrides, as given on the command line."""
    label = config_flags.get_config_filename(FLAGS["config"])
    overrides = config_flags.get_override_values(FLAGS["config"])
    return " ".join([label, *(f"--config.{k}={v}" for k, v in sorted(overrides.items()))])


def _option_value(text: str) -> bool | int | float | str:
    """An option's value as XLA reads it: true/false as bool, then int, float, else text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_xla_options(items: list[str]) -> dict[str, bool | int | float | str]:
    """`["name=value", ...]` as a dict of typed values; PlanError names an item without '='
    or without a name."""
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise PlanError(f"--xla_option={item!r} must be NAME=VALUE")
        options[name.strip().removeprefix("--")] = _option_value(value.strip())
    return options


def main(argv: list[str]) -> None:
    del argv  # `cli.run` has rejected positional arguments.
    config = FLAGS.config
    if FLAGS.batch > 0:
        config.batch_size = FLAGS.batch
    if FLAGS.autodiff:
        os.environ[backward.ENV] = ",".join(FLAGS.autodiff)
    try:
        options = parse_xla_options(FLAGS.xla_option)
        record = plan(
            config,
            FLAGS.topology,
            backend=FLAGS.backend,
            hbm_gib=FLAGS.hbm_gib,
            num_examples=FLAGS.num_examples,
            label=_label(),
            compiler_options=options,
        )
    except config_lib.ConfigError as e:
        cli.fail(PROGRAM, str(e))
    print(json.dumps(record), flush=True)
    print(format_table(record), file=sys.stderr, flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main, PROGRAM, required=("config", "topology"))
