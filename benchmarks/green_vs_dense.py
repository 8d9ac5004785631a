r"""GreenMIM vs SimMIM on the same Swin: what computing only the visible tokens saves.

Prints ONE JSON object to stdout (logs go to stderr):

  python benchmarks/green_vs_dense.py                       # Swin-B/224, window 7, batch 32
  python benchmarks/green_vs_dense.py --batch=8 --steps=5
  python benchmarks/green_vs_dense.py --green_config=configs/greenmim.py:quickstart  # smoke run

Both train steps are the train loop's own (`train.setup(...).train_step`: loss, grads, AdamW),
built in one process on the same devices with the same batch size, encoder (taken from the
GreenMIM config), mask unit and mask ratio: SimMIM (`configs/simmim.py`, every token through
the dense Swin, mask token + pixel-shuffle head + L1) and GreenMIM (visible tokens only, group
window attention, MAE decoder + norm-pix MSE). Their timed steps alternate, so machine noise
hits both alike.

Keys:
  dense, green            per method: flops (XLA cost analysis of the compiled step, all
                          devices), temp_bytes (XLA memory analysis, per device), step_s
                          (median of --steps timed steps), compile_s, img_per_s.
  flops_ratio, temp_memory_ratio, step_time_ratio
                          green / dense. On CPU, temp memory depends on XLA's scheduler (run
                          with XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false
                          to compare under its other schedule) and holds terms that do not grow
                          with the batch (optimizer temporaries, plan tensors), which weigh
                          most at small batches, hence the default of 32.
  temp_memory_ratio_marginal
                          the same ratio for one more example: green over dense growth of the
                          temp memory from --batch / 2 to --batch (both steps compiled at the
                          half batch too); dense, green hold temp_bytes_per_example.
  plan_ms_per_mask        host wall time of `greenmim.batch_mask_and_plans` (mask + every
                          stage's plans + merge indices) per mask over --masks masks, the
                          median of 5 passes (plan_ms_per_mask_passes holds all five).
  redraw_rate             redraws per mask over those masks (static plan overflow).
  padding_waste           padded slots / real tokens over the grouped layouts of all blocks.
  padding_flops_frac      attention-core FLOPs spent on padded slots, forward and backward
                          (3x forward), analytic: 4 C (G g^2 - sum_k n_k^2) per block and
                          example for groups holding n_k real tokens; over the green step's
                          XLA FLOPs. Only the attention core runs on the grouped layout
                          (SPEC 0), so pads cost nothing else.
  groups                  per grouped (stage, parity): static G, mean and max groups used.
  targets                 the issue's goals (flops <= 1/3, memory <= 0.25, time <= 1/2.7,
                          padding FLOPs < 3%, planning < 1 ms) and whether each holds.
"""

from __future__ import annotations

import importlib.util
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
import ml_collections
import numpy as np
from absl import app, flags
from probe import cost_analysis, host_info, memory_analysis, synthetic_batch

from mim_jax import config_lib, sharding, train
from mim_jax.methods import greenmim

ROOT = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("green_config", "configs/greenmim.py:swin_base_224", "GreenMIM config.")
flags.DEFINE_integer("batch", 32, "Global batch size of both steps.")
flags.DEFINE_integer("steps", 3, "Timed steps per method (alternating; medians reported).")
flags.DEFINE_integer("warmup", 1, "Untimed steps per method after compilation.")
flags.DEFINE_integer("masks", 200, "Masks for the planning time, redraw and padding stats.")
flags.DEFINE_string("dtype", "float32", "Compute dtype of both steps.")

PLAN_PASSES = 5
TARGETS = {
    "flops_ratio": 1 / 3,
    "temp_memory_ratio": 0.25,
    "step_time_ratio": 1 / 2.7,
    "padding_flops_frac": 0.03,
    "plan_ms_per_mask": 1.0,
}


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> its get_config(arg)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def configs() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(dense SimMIM, GreenMIM) configs sharing the encoder, mask, batch and dtype."""
    green = load_config(FLAGS.green_config)
    dense = load_config("configs/simmim.py")
    dense.model = ml_collections.ConfigDict(green.model.to_dict())
    dense.mask.patch_size = green.mask.patch_size
    dense.mask.ratio = green.mask.ratio
    for c in (green, dense):
        c.batch_size = FLAGS.batch
        c.dtype = FLAGS.dtype
        c.data.source = "bundled"
        c.total_steps = 1000
        config_lib.validate(c)
    return dense, green


def _compile(s: train.Setup, state, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """(compiled step, placed synthetic batch, compile seconds) of `s.train_step` at `state`."""
    with jax.set_mesh(mesh):
        local = synthetic_batch(config, config.batch_size // jax.process_count(), mesh)
        batch = s.place_batch(local)
        start = time.perf_counter()
        compiled = s.train_step.lower(state, batch).compile()
    return compiled, batch, time.perf_counter() - start


def compiled_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """(compiled step, state, placed batch, compile seconds) of `config`'s train step."""
    s = train.setup(config, mesh, num_examples=1_281_167)
    state = s.init_state()
    compiled, batch, seconds = _compile(s, state, config, mesh)
    return compiled, state, batch, seconds


def half_batch_temp_bytes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """Temp memory of `config`'s train step compiled (not run) at half its batch size."""
    half = ml_collections.ConfigDict(config.to_dict())
    half.batch_size = config.batch_size // 2
    s = train.setup(half, mesh, num_examples=1_281_167)
    compiled, _, _ = _compile(s, s.abstract_state, half, mesh)
    return memory_analysis(compiled)["temp_bytes"]


def plan_stats(config: ml_collections.ConfigDict) -> dict[str, object]:
    """Planning time, redraws and padding of the grouped layouts over --masks masks."""
    specs = greenmim.plan_specs_from_config(config)
    unit_grid = config.model.img_size // config.mask.patch_size
    depths = config.model.depths
    pass_ms = []
    for _ in range(PLAN_PASSES):  # The median pass: this shared VM's speed varies by 1.5x.
        start = time.perf_counter()
        drawn = [
            greenmim.batch_mask_and_plans(
                config.seed, 0, m, specs=specs, unit_grid=unit_grid, mask_ratio=config.mask.ratio
            )
            for m in range(FLAGS.masks)
        ]
        pass_ms.append((time.perf_counter() - start) / FLAGS.masks * 1e3)
    padded = real = waste_flops = 0.0
    groups = {}
    for stage, stage_specs in enumerate(specs):
        channels = config.model.embed_dim * 2**stage
        shifted_blocks = depths[stage] // 2 if len(stage_specs) == 2 else 0
        for parity, spec in enumerate(stage_specs):
            blocks = shifted_blocks if parity else depths[stage] - shifted_blocks
            g, num = spec.group_size, spec.num_groups
            used = []
            for _, plans, _ in drawn:
                window = plans["stages"][stage]["attn"][parity]["slot_window"]
                counts = (window >= 0).sum(axis=1)
                used.append(int((counts > 0).sum()))
                padded += blocks * (num * g - spec.num_visible)
                real += blocks * spec.num_visible
                waste_flops += blocks * 4 * channels * (num * g * g - float((counts**2).sum()))
            if spec.mode == "grouping":
                groups[f"stage{stage + 1}_shift{spec.shift}"] = {
                    "group_size": g,
                    "static_groups": num,
                    "mean_used": float(np.mean(used)),
                    "max_used": int(max(used)),
                }
    return {
        "plan_ms_per_mask": statistics.median(pass_ms),
        "plan_ms_per_mask_passes": pass_ms,
        "redraw_rate": sum(count for _, _, count in drawn) / FLAGS.masks,
        "padding_waste": padded / real,
        # Per example, forward and backward (3x forward), mean over the sampled masks.
        "padding_flops_per_example": 3 * waste_flops / FLAGS.masks,
        "groups": groups,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger().setLevel(logging.INFO)
    dense_config, green_config = configs()
    mesh = sharding.make_mesh(green_config.mesh)
    sharding.check_batch_size(FLAGS.batch, mesh)
    runs = {}
    for name, config in (("dense", dense_config), ("green", green_config)):
        compiled, state, batch, compile_s = compiled_step(config, mesh)
        logging.info("%s: compiled in %.1f s", name, compile_s)
        runs[name] = {"compiled": compiled, "state": state, "batch": batch, "times": []}
        runs[name]["compile_s"] = compile_s
    with jax.set_mesh(mesh):
        for run in runs.values():
            for _ in range(FLAGS.warmup):
                run["state"], _ = run["compiled"](run["state"], run["batch"])
            jax.block_until_ready(run["state"])
        for i in range(FLAGS.steps):
            for name, run in runs.items():
                start = time.perf_counter()
                run["state"], metrics = run["compiled"](run["state"], run["batch"])
                jax.block_until_ready((run["state"], metrics))
                run["times"].append(time.perf_counter() - start)
                logging.info("%s step %d: %.3f s", name, i, run["times"][-1])
    scale = mesh.devices.size
    record: dict[str, object] = {}
    for name, run in runs.items():
        step_s = statistics.median(run["times"])
        record[name] = {
            "flops": cost_analysis(run["compiled"]).get("flops", 0.0) * scale,
            "temp_bytes": memory_analysis(run["compiled"])["temp_bytes"],
            "step_s": step_s,
            "step_s_all": run["times"],
            "compile_s": run["compile_s"],
            "img_per_s": FLAGS.batch / step_s,
        }
    for name, config in (("dense", dense_config), ("green", green_config)):
        half = half_batch_temp_bytes(config, mesh)
        record[name]["temp_bytes_per_example"] = (record[name]["temp_bytes"] - half) / (
            FLAGS.batch - FLAGS.batch // 2
        )
    dense, green = record["dense"], record["green"]
    stats = plan_stats(green_config)
    padding_flops = stats.pop("padding_flops_per_example") * FLAGS.batch
    record.update(
        flops_ratio=green["flops"] / dense["flops"],
        temp_memory_ratio=green["temp_bytes"] / dense["temp_bytes"],
        temp_memory_ratio_marginal=green["temp_bytes_per_example"]
        / dense["temp_bytes_per_example"],
        step_time_ratio=green["step_s"] / dense["step_s"],
        padding_flops_frac=padding_flops / green["flops"],
        **stats,
    )
    record["targets"] = {
        key: {"target": bound, "met": bool(record[key] <= bound)} for key, bound in TARGETS.items()
    }
    m = green_config.model
    record.update(
        model=f"swin e{m.embed_dim} d{'-'.join(map(str, m.depths))} w{m.window_size}",
        image_size=m.img_size,
        mask_ratio=green_config.mask.ratio,
        batch=FLAGS.batch,
        dtype=FLAGS.dtype,
        devices=mesh.devices.size,
        platform=jax.devices()[0].platform,
        device_kind=jax.devices()[0].device_kind,
        host=host_info(),
        jax=jax.__version__,
    )
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    app.run(main)
