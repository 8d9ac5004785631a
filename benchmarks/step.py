r"""Train-step probe: XLA FLOPs / memory of the compiled step, step time, and a matmul roofline.

Prints ONE JSON line to stdout (logs go to stderr) for one config per run:

  python benchmarks/step.py --config=configs/simmim.py:swin_base_192 --batch=8 --steps=3
  python benchmarks/step.py --config=configs/simmim.py:vit_base_224 --batch=8 \
      --config.dtype=bfloat16

A table, one line per variant:

  for v in swin_base_192 vit_base_224 quickstart; do
    python benchmarks/step.py --config=configs/simmim.py:$v --batch=8 --steps=3
  done > step.jsonl

Two configs in one run (the second is the baseline; ratios are this / baseline), e.g. the
cost of iTPN's masked feature modeling over the pixel loss alone:

  python benchmarks/step.py --config=configs/itpn.py:base_pixel_mfm \
      --baseline=configs/itpn.py:base_pixel --ratio_key=mfm_overhead_ratio --batch=8 --steps=3

The step is the train loop's own (`train.setup(...).train_step`: loss, grads, AdamW, metrics,
donated state), so any method works through the same interface: `build_model`,
`make_batch_transform` and `loss_fn`. No data is read: the batch is random-normal images of
the configured shape plus the method's host-side fields (masks, group plans) from its batch
transform, so the numbers measure the step alone.

Keys:
  flops, bytes_accessed   per step, summed over all devices (XLA cost analysis describes one
                          device's SPMD program; `flops_per_device` is that number).
  temp_bytes, argument_bytes, output_bytes, alias_bytes
                          per device, from the compiled executable's memory analysis.
  compile_s               lowering + compilation of the step.
  step_s, img_per_s       median over --steps timed steps after --warmup steps.
  flops_per_s             flops / step_s (all devices).
  baseline, <ratio_key>, flops_ratio, temp_memory_ratio
                          with --baseline: its record, and step time / FLOPs / temp memory
                          of --config over the baseline's.
  matmul_flops_per_s      achieved FLOP/s of one dense [N, N] x [N, N] matmul per device in the
                          compute dtype (config.dtype), all devices at once; N grows until one
                          call takes >= 50 ms. matmul_fraction = flops_per_s / matmul_flops_per_s.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from probe import cost_analysis, host_info, memory_analysis, synthetic_batch

from mim_jax import config_checks, distributed, sharding, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant[,key=value...]'.", lock_config=True
)
config_flags.DEFINE_config_file(
    "baseline",
    None,
    "Optional second config, measured in the same run; adds ratios (this / baseline).",
    lock_config=True,
)
flags.DEFINE_string(
    "ratio_key", "step_time_ratio", "Key of the step-time ratio (e.g. mfm_overhead_ratio)."
)
flags.DEFINE_integer("batch", 0, "Global batch size; overrides config.batch_size when > 0.")
flags.DEFINE_integer("steps", 10, "Timed train steps (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed train steps before the timed ones.")
flags.DEFINE_integer("num_examples", 1_281_167, "Data set size for the lr schedule (ImageNet).")
flags.DEFINE_bool("matmul", True, "Measure the dense-matmul roofline (matmul_* keys).")
flags.mark_flags_as_required(["config"])

_MATMUL_MIN_S = 0.05  # Grow N until one matmul call takes at least this long ...
_MATMUL_MAX_N = 16384  # ... or N reaches this.
_MATMUL_REPEATS = 5

# (embed_dim, depths) -> size name, for the `model` key; anything else is spelled out.
_SWIN_SIZES = {
    (96, (2, 2, 6, 2)): "tiny",
    (96, (2, 2, 18, 2)): "small",
    (128, (2, 2, 18, 2)): "base",
    (192, (2, 2, 18, 2)): "large",
}
_VIT_SIZES = {(192, 12): "tiny", (384, 12): "small", (768, 12): "base", (1024, 24): "large"}


def model_name(model: ml_collections.ConfigDict) -> str:
    """'swin_base', 'vit_base', or e.g. 'swin_e48_d2-2-2-2' for a non-standard size."""
    depths = model.get("depths", model.get("depth"))
    depths = tuple(depths) if isinstance(depths, list | tuple) else depths
    known = {"swin": _SWIN_SIZES, "vit": _VIT_SIZES}.get(model.name, {})
    size = known.get((model.embed_dim, depths))
    if size:
        return f"{model.name}_{size}"
    spelled = "-".join(map(str, depths)) if isinstance(depths, tuple) else str(depths)
    return f"{model.name}_e{model.embed_dim}_d{spelled}"


def matmul_roofline(mesh: jax.sharding.Mesh, dtype) -> dict[str, float]:
    """Achieved FLOP/s of one [N, N] x [N, N] matmul per device, on all devices of `mesh` at once.

    Also returns `cost_scale`: the analytic FLOPs over what XLA's cost analysis reports for the
    same sharded program (the device count if the analysis is per device, else 1).
    """
    num_devices = mesh.devices.size
    spread = NamedSharding(mesh, PartitionSpec(sharding.MESH_AXES))
    matmul = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=spread)

    def timed(fn, *args) -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - start

    n = 256
    while True:
        shape = (num_devices, n, n)
        operands = jax.jit(
            lambda key, shape=shape: tuple(
                jax.random.normal(k, shape, dtype) for k in jax.random.split(key)
            ),
            out_shardings=(spread, spread),
        )(jax.random.key(0))
        compiled = matmul.lower(*operands).compile()
        timed(compiled, *operands)  # Warm-up.
        if timed(compiled, *operands) >= _MATMUL_MIN_S or n >= _MATMUL_MAX_N:
            break
        n *= 2
    seconds = statistics.median(timed(compiled, *operands) for _ in range(_MATMUL_REPEATS))
    flops = 2.0 * n**3 * num_devices
    reported = cost_analysis(compiled).get("flops") or flops
    return {
        "matmul_n": n,
        "matmul_s": seconds,
        "matmul_flops_per_s": flops / seconds,
        "cost_scale": max(1, round(flops / reported)),
    }


def benchmark(config: ml_collections.ConfigDict, variant: str) -> dict[str, object]:
    """Compiles and times the train step of `config`; returns the JSON record."""
    config_checks.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    sharding.log_mesh(mesh)
    num_devices = mesh.devices.size
    local_batch = config.batch_size // jax.process_count()
    host_batch = synthetic_batch(config, local_batch, mesh)

    start = time.perf_counter()
    s = train.setup(config, mesh, FLAGS.num_examples)
    state = jax.block_until_ready(s.init_state())
    init_s = time.perf_counter() - start
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    logging.info("%s: %.1fM parameters, init %.1f s", variant, num_params / 1e6, init_s)

    with jax.set_mesh(mesh):
        batch = s.place_batch(host_batch)
        start = time.perf_counter()
        compiled = s.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        logging.info("compiled in %.1f s", compile_s)

        times, metrics = [], {}
        for i in range(FLAGS.warmup + FLAGS.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)  # Donates `state`: feed the new one back.
            jax.block_until_ready((state, metrics))
            if i >= FLAGS.warmup:
                times.append(time.perf_counter() - start)
            logging.info("step %d: %.3f s", i, time.perf_counter() - start)
        roofline = matmul_roofline(mesh, jnp.dtype(config.dtype)) if FLAGS.matmul else {}

    costs = cost_analysis(compiled)
    scale = roofline.pop("cost_scale", num_devices)
    flops_per_device = costs.get("flops")
    flops = flops_per_device * scale if flops_per_device is not None else None
    bytes_accessed = costs.get("bytes accessed")
    step_s = statistics.median(times) if times else None
    flops_per_s = flops / step_s if flops and step_s else None
    matmul_flops_per_s = roofline.get("matmul_flops_per_s")
    device = jax.devices()[0]
    return {
        "variant": variant,
        "model": model_name(config.model),
        "method": config.method,
        "image_size": config.model.img_size,
        "batch": config.batch_size,
        "devices": num_devices,
        "mesh": sharding.describe(mesh),
        "dtype": config.dtype,
        "params": num_params,
        "flops": flops,
        "flops_per_device": flops_per_device,
        "bytes_accessed": bytes_accessed * scale if bytes_accessed is not None else None,
        **memory_analysis(compiled),
        "init_s": init_s,
        "compile_s": compile_s,
        "steps": len(times),
        "step_s": step_s,
        "step_s_min": min(times) if times else None,
        "img_per_s": config.batch_size / step_s if step_s else None,
        "flops_per_s": flops_per_s,
        **roofline,
        "matmul_dtype": config.dtype if roofline else None,
        "matmul_fraction": (
            flops_per_s / matmul_flops_per_s if flops_per_s and matmul_flops_per_s else None
        ),
        "loss": float(jax.device_get(metrics["loss"])) if metrics else None,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "host": host_info(),
        "jax": jax.__version__,
    }


def _variant(name: str) -> str:
    """The config file, variant and overrides of flag `name`, for the record."""
    variant = config_flags.get_config_filename(FLAGS[name])
    overrides = config_flags.get_override_values(FLAGS[name])
    if overrides:
        variant += " " + " ".join(f"--{name}.{k}={v}" for k, v in sorted(overrides.items()))
    return variant


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger().setLevel(logging.INFO)
    distributed.initialize_distributed()
    configs = [("config", FLAGS.config)]
    if FLAGS.baseline is not None:
        configs.append(("baseline", FLAGS.baseline))
    records = []
    for name, config in configs:
        if FLAGS.batch > 0:
            config.batch_size = FLAGS.batch
        records.append(benchmark(config, _variant(name)))
    record = records[0]
    if len(records) == 2:
        base = records[1]
        record["baseline"] = base
        record[FLAGS.ratio_key] = record["step_s"] / base["step_s"]
        record["flops_ratio"] = record["flops"] / base["flops"]
        record["temp_memory_ratio"] = record["temp_bytes"] / base["temp_bytes"]
    if jax.process_index() == 0:
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    app.run(main)
