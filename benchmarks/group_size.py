r"""GreenMIM group-size sweep: is the attention cost minimal near g = window**2? (SPEC 2.3 note).

Reproduces the paper's group-size finding for Swin-B/224 (patch 4, depths 2-2-18-2, embed 128,
mask unit 32) with mim_jax's own host-side code: batch-wise masks from
`masking.batchwise_keep(seed, step, group_ids)`, max-fill packing from `grouping`, and the
static plan shapes of `grouping.plan_specs`. Prints ONE JSON object to stdout (logs go to
stderr):

  python benchmarks/group_size.py                      # window 7, 500 masks, ratio 0.75
  python benchmarks/group_size.py --window=14 --masks=200

For every 'grouping'-mode (stage, shift parity) of the default plan specs and every candidate
group size g (the largest window count seen over the masks, then window**2 times
1, 8/7, 64/49, 81/49, 2, 128/49, 3, 4, rounded; candidates below the largest window count are
dropped since they cannot hold every window), the cost model is
`per_group(g) = 4 g C**2 + 2 g**2 C` (C = stage channels) and:

  mean_cost_rel    mean over masks of n_groups(g) * per_group(g) (`grouping.search_group_size`),
                   relative to the same at g = window**2.
  static_cost_rel  ceil(2 N_vis / g) * per_group(g): the default static group count (num_groups 0)
                   (`plan_specs(group_size=g).num_groups`), relative to the same reference as
                   mean_cost_rel (the packed mean cost at g = window**2), so both are comparable.
  mean_groups, max_groups, static_groups
                   groups the max-fill packing uses (mean / max over masks) and G allocated.
  argmin_g, argmin_static_g
                   the candidate minimizing mean_cost_rel / static_cost_rel.
  min_near_window_sq
                   argmin_g lies within +-30% of window**2.

`plan_ms_per_mask` is the wall time of `grouping.plan_mask` (default specs: every stage and
parity, index arrays included) per sampled mask, after one warm-up call.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from absl import app, flags

from mim_jax import grouping, masking

FLAGS = flags.FLAGS
flags.DEFINE_integer("window", 7, "Swin window size (7 or 14).")
flags.DEFINE_integer("masks", 500, "Number of sampled batch-wise masks.")
flags.DEFINE_float("ratio", 0.75, "Mask ratio.")
flags.DEFINE_integer("seed", 0, "Mask seed (masks use step --step and group ids 0..masks-1).")
flags.DEFINE_integer("step", 0, "Mask step.")
flags.DEFINE_float("near", 0.3, "Relative tolerance of min_near_window_sq around window**2.")

# Swin-B at 224 px.
IMG_SIZE = 224
PATCH_SIZE = 4
DEPTHS = (2, 2, 18, 2)
EMBED_DIM = 128
MASK_UNIT = 32

# Candidate group sizes as multiples of window**2 (49, 56, 64, 81, 98, 128, 147, 196 at w=7).
_FACTORS = (1, 8 / 7, 64 / 49, 81 / 49, 2, 128 / 49, 3, 4)


def _specs(window: int, ratio: float, group_size: int | None = None):
    return grouping.plan_specs(
        img_size=IMG_SIZE,
        patch_size=PATCH_SIZE,
        depths=DEPTHS,
        window_size=window,
        mask_unit=MASK_UNIT,
        mask_ratio=ratio,
        group_size=group_size,
    )


def _window_counts(keep: np.ndarray, unit_grid: int, spec: grouping.StagePlanSpec) -> np.ndarray:
    """Visible-token count of each non-empty window, in window-id order (as the packing sees)."""
    coords = grouping.visible_coords(keep, unit_grid, spec.resolution)
    wid = grouping.window_ids(coords, spec.window, spec.shift)
    return np.unique(wid, return_counts=True)[1]


def _sweep(
    keeps: np.ndarray, unit_grid: int, stage: int, spec: grouping.StagePlanSpec, ratio: float
) -> dict:
    w2 = spec.window**2
    channels = EMBED_DIM * 2**stage
    counts = [_window_counts(keep, unit_grid, spec) for keep in keeps]
    max_count = int(max(c.max() for c in counts))
    candidates = sorted(
        {max_count, w2} | {round(w2 * f) for f in _FACTORS if round(w2 * f) >= max_count}
    )
    t0 = time.perf_counter()
    mean_cost = grouping.search_group_size(
        keeps,
        resolution=spec.resolution,
        window=spec.window,
        shift=spec.shift,
        num_visible=spec.num_visible,
        channels=channels,
        candidates=candidates,
    )
    search_s = time.perf_counter() - t0
    rows = []
    for g in candidates:
        per_group = 4 * g * channels**2 + 2 * g**2 * channels
        used = np.array([len(grouping.max_fill_packing(c, g)) for c in counts])
        if not math.isclose(used.mean() * per_group, mean_cost[g], rel_tol=1e-9):
            raise AssertionError(f"g={g}: search_group_size disagrees with max_fill_packing")
        static = _specs(spec.window, ratio, g)[stage][int(spec.shift > 0)]
        assert static.mode == grouping.GROUPING and static.group_size == g
        if used.max() > static.num_groups:
            raise AssertionError(f"g={g}: {used.max()} groups > static G={static.num_groups}")
        rows.append((g, mean_cost[g], static.num_groups * per_group, used, static.num_groups))
    ref = mean_cost[w2]
    mean_rel = [cost / ref for _, cost, _, _, _ in rows]
    static_rel = [cost / ref for _, _, cost, _, _ in rows]
    argmin = candidates[int(np.argmin(mean_rel))]
    argmin_static = candidates[int(np.argmin(static_rel))]
    logging.info(
        "stage %d shift %d: N=%d C=%d max window count %d, argmin g=%d (static %d), search %.2fs",
        stage + 1, spec.shift, spec.num_visible, channels, max_count, argmin, argmin_static,
        search_s,
    )  # fmt: skip
    return {
        "stage": stage + 1,
        "shift": spec.shift,
        "resolution": spec.resolution,
        "window": spec.window,
        "channels": channels,
        "num_visible": spec.num_visible,
        "max_window_count": max_count,
        "lower_bound_groups_at_window_sq": math.ceil(spec.num_visible / w2),
        "candidates": candidates,
        "mean_cost_rel": [round(x, 4) for x in mean_rel],
        "static_cost_rel": [round(x, 4) for x in static_rel],
        "mean_groups": [round(float(r[3].mean()), 3) for r in rows],
        "max_groups": [int(r[3].max()) for r in rows],
        "static_groups": [r[4] for r in rows],
        "argmin_g": argmin,
        "argmin_static_g": argmin_static,
        "min_near_window_sq": bool(abs(argmin - w2) <= FLAGS.near * w2),
        "search_s": round(search_s, 3),
    }


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    window, ratio = FLAGS.window, FLAGS.ratio
    unit_grid = IMG_SIZE // MASK_UNIT
    mask, _ = masking.batchwise_keep(
        FLAGS.seed,
        FLAGS.step,
        np.arange(FLAGS.masks),
        num_units=unit_grid**2,
        mask_ratio=ratio,
    )
    keeps = 1 - mask
    specs = _specs(window, ratio)

    grouping.plan_mask(keeps[0], specs, unit_grid)  # Warm-up: numba compiles or loads its cache.
    t0 = time.perf_counter()
    for keep in keeps:
        grouping.plan_mask(keep, specs, unit_grid)
    plan_ms = (time.perf_counter() - t0) * 1e3 / len(keeps)
    logging.info("plan_mask: %.3f ms per mask", plan_ms)

    results = [
        _sweep(keeps, unit_grid, stage, spec, ratio)
        for stage, stage_specs in enumerate(specs)
        for spec in stage_specs
        if spec.mode == grouping.GROUPING
    ]
    report = {
        "model": "swin_base_224",
        "img_size": IMG_SIZE,
        "patch_size": PATCH_SIZE,
        "depths": list(DEPTHS),
        "embed_dim": EMBED_DIM,
        "mask_unit": MASK_UNIT,
        "window": window,
        "mask_ratio": ratio,
        "masks": len(keeps),
        "seed": FLAGS.seed,
        "step": FLAGS.step,
        "cost_model": "n_groups(g) * (4*g*C**2 + 2*g**2*C); rel = / mean packed cost at g=w**2",
        "stage_modes": [[s.mode for s in stage] for stage in specs],
        "plan_ms_per_mask": round(plan_ms, 4),
        "stages": results,
        "all_min_near_window_sq": all(r["min_near_window_sq"] for r in results),
        "wall_s": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
