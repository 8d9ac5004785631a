"""Tests for mim_jax.grouping against independent references written here: brute-force subset
enumeration, the official DP-table knapsack, Swin's roll-and-region windows, pairwise loops."""

import itertools
import math
import time

import numpy as np
import pytest

from mim_jax import grouping, masking

SWIN_B7 = dict(
    img_size=224, patch_size=4, depths=(2, 2, 18, 2), window_size=7, mask_unit=32, mask_ratio=0.75
)
SWIN_B14 = dict(SWIN_B7, window_size=14)
TINY = dict(
    img_size=64, patch_size=4, depths=(2, 2, 2), window_size=4, mask_unit=16, mask_ratio=0.5
)


def _keep_masks(config: dict, count: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """`count` batch-wise unit keep masks (1 = visible) and the unit grid side."""
    grid = config["img_size"] // config["mask_unit"]
    mask, _ = masking.batchwise_keep(
        seed, 0, np.arange(count), num_units=grid**2, mask_ratio=config["mask_ratio"]
    )
    return 1 - mask, grid


# ---------------------------------------------------------------------------------------------
# Independent references.


def _brute_best(sizes: list[int], capacity: int) -> tuple[int, tuple[int, ...]]:
    """Max subset sum <= capacity over all subsets; ties: colex-smallest (compare descending)."""
    best, choice = -1, ()
    for r in range(1, len(sizes) + 1):
        for subset in itertools.combinations(range(len(sizes)), r):
            total = sum(sizes[i] for i in subset)
            if total > capacity:
                continue
            key = sorted(subset, reverse=True)
            if total > best or (total == best and key < sorted(choice, reverse=True)):
                best, choice = total, subset
    return best, choice


def _brute_greedy(sizes: list[int], capacity: int) -> list[list[int]]:
    remaining = list(range(len(sizes)))
    groups = []
    while remaining:
        _, subset = _brute_best([sizes[i] for i in remaining], capacity)
        groups.append([remaining[i] for i in subset])
        remaining = [x for i, x in enumerate(remaining) if i not in subset]
    return groups


def _table_greedy(sizes: list[int], capacity: int) -> list[list[int]]:
    """The official `group_windows`: DP table K[i][w], backtrack from the last item."""
    remaining = list(range(len(sizes)))
    groups = []
    while remaining:
        wt = [sizes[i] for i in remaining]
        K = [[0] * (capacity + 1) for _ in range(len(wt) + 1)]
        for i in range(1, len(wt) + 1):
            for w in range(capacity + 1):
                K[i][w] = K[i - 1][w]
                if wt[i - 1] <= w:
                    K[i][w] = max(K[i][w], wt[i - 1] + K[i - 1][w - wt[i - 1]])
        res, w, picked = K[-1][capacity], capacity, []
        for i in range(len(wt), 0, -1):
            if res <= 0:
                break
            if res != K[i - 1][w]:
                picked.append(i - 1)
                res -= wt[i - 1]
                w -= wt[i - 1]
        picked.reverse()
        groups.append([remaining[i] for i in picked])
        remaining = [x for i, x in enumerate(remaining) if i not in picked]
    return groups


def _swin_window_key(coords: np.ndarray, resolution: int, window: int, shift: int) -> np.ndarray:
    """Swin's definition: roll the grid by -shift, partition into windows, split by region."""
    rolled = (coords - shift) % resolution  # rolled[p] holds original (p + shift) % resolution
    win = rolled // window
    if shift:
        region = (rolled >= resolution - window).astype(int) + (rolled >= resolution - shift)
    else:
        region = np.zeros_like(rolled)
    parts = np.concatenate([win, region], axis=1)
    return parts @ np.array([1_000_000, 1_000, 10, 1])


def _same(keys: np.ndarray) -> np.ndarray:
    return keys[:, None] == keys[None, :]


# ---------------------------------------------------------------------------------------------
# max_fill_packing.


def test_max_fill_packing_matches_brute_force_and_official_table():
    rng = np.random.default_rng(0)
    for _ in range(150):
        capacity = int(rng.integers(1, 25))
        n = int(rng.integers(1, 10))
        sizes = rng.integers(1, capacity + 1, n).tolist()
        groups = [g.tolist() for g in grouping.max_fill_packing(np.array(sizes), capacity)]
        best, _ = _brute_best(sizes, capacity)
        assert sum(sizes[i] for i in groups[0]) == best
        assert groups == _brute_greedy(sizes, capacity), (sizes, capacity)
        assert groups == _table_greedy(sizes, capacity), (sizes, capacity)


def test_max_fill_tie_break_is_colex_not_lex():
    # {0, 3} and {1, 2} both fill 4; the official backtracking keeps the smaller largest index.
    groups = grouping.max_fill_packing(np.array([1, 2, 2, 3]), 4)
    assert [g.tolist() for g in groups] == [[1, 2], [0, 3]]
    assert _table_greedy([1, 2, 2, 3], 4) == [[1, 2], [0, 3]]


def test_max_fill_packing_rejects_oversized_counts():
    with pytest.raises(ValueError):
        grouping.max_fill_packing(np.array([3, 9]), 8)


# ---------------------------------------------------------------------------------------------
# Specs and coordinates.


def test_plan_specs_swin_b():
    s = grouping.StagePlanSpec
    assert grouping.plan_specs(**SWIN_B7) == [
        [s(56, 7, 0, 768, 49, 32, "grouping"), s(56, 7, 3, 768, 49, 32, "grouping")],
        [s(28, 7, 0, 192, 49, 8, "grouping"), s(28, 7, 3, 192, 49, 8, "grouping")],
        [s(14, 7, 0, 48, 48, 1, "masking"), s(14, 7, 3, 48, 48, 1, "masking")],
        [s(7, 7, 0, 12, 12, 1, "masking")],
    ]
    assert grouping.plan_specs(**SWIN_B14) == [
        [s(56, 14, 0, 768, 196, 8, "grouping"), s(56, 14, 7, 768, 196, 8, "grouping")],
        [s(28, 14, 0, 192, 192, 1, "masking"), s(28, 14, 7, 192, 192, 1, "masking")],
        [s(14, 14, 0, 48, 48, 1, "masking")],
        [s(7, 7, 0, 12, 12, 1, "masking")],
    ]
    custom = grouping.plan_specs(**SWIN_B7, group_size=[64, None, None, None], num_groups=20)
    assert (custom[0][1].group_size, custom[0][1].num_groups) == (64, 20)
    assert (custom[1][0].group_size, custom[1][0].num_groups) == (49, 20)
    assert custom[2][0].num_groups == 1
    with pytest.raises(ValueError):
        grouping.plan_specs(**dict(SWIN_B7, mask_unit=16))


def test_visible_coords_matches_kron_upsampling():
    keep, grid = _keep_masks(SWIN_B7, 3)
    for unit_keep in keep:
        for resolution, per_unit in [(56, 64), (28, 16), (14, 4), (7, 1)]:
            scale = resolution // grid
            dense = np.kron(unit_keep.reshape(grid, grid), np.ones((scale, scale), int))
            expected = [(r, c) for r in range(resolution) for c in range(resolution) if dense[r, c]]
            coords = grouping.visible_coords(unit_keep, grid, resolution)
            assert coords.dtype == np.int32 and len(coords) == 12 * per_unit
            assert [tuple(rc) for rc in coords.tolist()] == expected


@pytest.mark.parametrize(
    ("resolution", "window"), [(56, 7), (28, 7), (14, 7), (56, 14), (28, 14), (16, 4)]
)
def test_window_ids_equal_swin_rolled_windows(resolution, window):
    rng = np.random.default_rng(resolution + window)
    for shift in (0, window // 2):
        for _ in range(5):
            coords = np.argwhere(rng.random((resolution, resolution)) < 0.4)
            ours = grouping.window_ids(coords, window, shift)
            ref = _swin_window_key(coords, resolution, window, shift)
            np.testing.assert_array_equal(_same(ours), _same(ref))


# ---------------------------------------------------------------------------------------------
# Plans.


def _check_plan(plan: grouping.StagePlan, spec: grouping.StagePlanSpec, coords: np.ndarray):
    G, g, n = spec.num_groups, spec.group_size, spec.num_visible
    assert plan.gather.shape == plan.valid.shape == (G * g,)
    assert plan.attn_mask.shape == plan.rel_index.shape == (G, g, g)
    assert plan.gather.dtype == plan.slot_of_token.dtype == plan.rel_index.dtype == np.int32
    assert plan.valid.dtype == plan.attn_mask.dtype == bool
    # Every visible token sits in exactly one real slot; pads gather token 0.
    assert sorted(plan.gather[plan.valid].tolist()) == list(range(n))
    assert (plan.gather[~plan.valid] == 0).all()
    np.testing.assert_array_equal(plan.gather[plan.slot_of_token], np.arange(n))
    assert plan.valid[plan.slot_of_token].all()
    # Attention: same Swin window (independent definition) and both real.
    key = _swin_window_key(coords.astype(int), spec.resolution, spec.window, spec.shift)
    slot_key = np.where(plan.valid, key[plan.gather], -1).reshape(G, g)
    valid = plan.valid.reshape(G, g)
    expected = (slot_key[:, :, None] == slot_key[:, None, :]) & valid[:, :, None] & valid[:, None]
    np.testing.assert_array_equal(plan.attn_mask, expected)
    # A window is never split between groups.
    group = plan.slot_of_token // g
    assert (group[:, None] == group[None, :])[_same(key)].all()
    # Groups in use come first, each but the last more than half full (max-fill).
    fill = valid.sum(1)
    used = plan.num_groups_used
    assert used <= G and (fill[:used] > 0).all() and (fill[used:] == 0).all()
    assert (2 * fill[: used - 1] > g).all()
    return used


def _check_mask(unit_keep: np.ndarray, specs: list, grid: int, used: dict) -> None:
    """Checks every plan of one mask; appends the groups used to `used[(resolution, shift)]`."""
    plans = grouping.plan_mask(unit_keep, specs, grid)
    assert [len(p) for p in plans] == [len(s) for s in specs]
    for stage_specs, stage_plans in zip(specs, plans, strict=True):
        coords = grouping.visible_coords(unit_keep, grid, stage_specs[0].resolution)
        for spec, plan in zip(stage_specs, stage_plans, strict=True):
            used.setdefault((spec.resolution, spec.shift), []).append(
                _check_plan(plan, spec, coords)
            )
            if spec.mode == grouping.MASKING:
                np.testing.assert_array_equal(plan.gather, np.arange(spec.num_visible))


def test_plans_of_random_masks_swin_b7():
    specs = grouping.plan_specs(**SWIN_B7)
    keep, grid = _keep_masks(SWIN_B7, 200, seed=1)
    used = {}
    for unit_keep in keep:
        _check_mask(unit_keep, specs, grid, used)
    assert min(used[(56, 0)]) >= math.ceil(768 / 49)
    assert max(used[(56, 0)]) <= 32 and max(used[(28, 3)]) <= 8


@pytest.mark.parametrize("config", [SWIN_B14, TINY], ids=["swin_b14", "tiny"])
def test_plans_of_random_masks_other_configs(config):
    specs = grouping.plan_specs(**config)
    keep, grid = _keep_masks(config, 40, seed=2)
    for unit_keep in keep:
        _check_mask(unit_keep, specs, grid, {})


def test_group_bound_holds_for_any_window_layout():
    """G = ceil(2N/g) fits max-fill packing of arbitrary (non-unit-aligned) visible sets."""
    rng = np.random.default_rng(3)
    for _ in range(60):
        coords = np.argwhere(rng.random((28, 28)) < rng.uniform(0.1, 0.9))
        n, g, shift = len(coords), int(rng.choice([49, 64, 80])), int(rng.integers(0, 4))
        spec = grouping.StagePlanSpec(28, 7, shift, n, g, math.ceil(2 * n / g), grouping.GROUPING)
        _check_plan(grouping.stage_plan(coords, spec), spec, coords)


@pytest.mark.parametrize(
    ("config", "stage"),
    [(SWIN_B7, 0), (SWIN_B7, 1), (SWIN_B7, 2), (SWIN_B14, 0), (TINY, 0)],
    ids=["b7_stage1", "b7_stage2", "b7_stage3", "b14_stage1", "tiny_stage1"],
)
def test_rel_index_matches_pairwise_loop(config, stage):
    keep, grid = _keep_masks(config, 1, seed=4)
    for spec in grouping.plan_specs(**config)[stage]:
        coords = grouping.visible_coords(keep[0], grid, spec.resolution)
        plan = grouping.stage_plan(coords, spec)
        w, slot_coords = spec.window, coords[plan.gather].reshape(spec.num_groups, -1, 2)
        expected = np.zeros_like(plan.rel_index)
        for k, a, b in zip(*np.nonzero(plan.attn_mask), strict=True):
            (yi, xi), (yj, xj) = slot_coords[k, a], slot_coords[k, b]
            expected[k, a, b] = (yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)
        np.testing.assert_array_equal(plan.rel_index, expected)
        assert plan.rel_index.min() >= 0 and plan.rel_index.max() < (2 * w - 1) ** 2


def test_plans_are_deterministic():
    specs = grouping.plan_specs(**SWIN_B7)
    keep, grid = _keep_masks(SWIN_B7, 3, seed=5)
    first = grouping.plan_mask(keep[0], specs, grid)
    grouping.plan_mask(keep[1], specs, grid)
    again = grouping.plan_mask(keep[0].copy(), specs, grid)
    for a, b in zip(itertools.chain(*first), itertools.chain(*again), strict=True):
        assert a.num_groups_used == b.num_groups_used
        for name in ("gather", "slot_of_token", "valid", "attn_mask", "rel_index"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_plan_overflow():
    keep, grid = _keep_masks(SWIN_B7, 1)
    coords = grouping.visible_coords(keep[0], grid, 56)
    too_few = grouping.plan_specs(**SWIN_B7, num_groups=15)[0][0]  # 15 * 49 < 768 slots.
    with pytest.raises(grouping.PlanOverflow):
        grouping.stage_plan(coords, too_few)
    # Every visible 8x8 unit overlaps some 7x7 window by >= 4 rows and >= 4 columns.
    too_small = grouping.plan_specs(**SWIN_B7, group_size=15)[0][0]
    with pytest.raises(grouping.PlanOverflow):
        grouping.stage_plan(coords, too_small)


def test_search_group_size_matches_plans():
    keep, grid = _keep_masks(SWIN_B7, 20, seed=6)
    costs = grouping.search_group_size(
        keep,
        resolution=28,
        window=7,
        shift=3,
        num_visible=192,
        channels=256,
        candidates=[15, 49, 64, 98],
    )
    assert costs[15] == math.inf
    for g in (49, 64, 98):
        spec = grouping.StagePlanSpec(28, 7, 3, 192, g, 100, grouping.GROUPING)
        groups = [
            grouping.stage_plan(grouping.visible_coords(k, grid, 28), spec).num_groups_used
            for k in keep
        ]
        expected = np.mean(groups) * (4 * g * 256**2 + 2 * g**2 * 256)
        assert costs[g] == pytest.approx(expected)


def test_planning_time_swin_b7():
    specs = grouping.plan_specs(**SWIN_B7)
    keep, grid = _keep_masks(SWIN_B7, 50, seed=7)
    start = time.perf_counter()
    for unit_keep in keep:
        grouping.plan_mask(unit_keep, specs, grid)
    per_mask_ms = (time.perf_counter() - start) / len(keep) * 1e3
    print(f"grouping: {per_mask_ms:.2f} ms per mask (all stages/parities, Swin-B/224 w7 r0.75)")
    assert per_mask_ms < 5.0
