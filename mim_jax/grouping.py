"""GreenMIM group window attention plans (SPEC 2.3 and SPEC 0 "group plans with static shapes").

Host-side numpy only. A batch-wise mask (one per mask group) fixes the visible tokens of every
Swin stage. For each stage and shift parity, `stage_plan` packs the non-empty windows of those
tokens into `G` groups of `g` slots with repeated max-fill 0/1 knapsacks and returns
static-shape per-slot index vectors that enter the jitted step as data.

How the model uses a plan (the visible tokens `x` are `[batch, N_vis, C]` in raster order):
- per-token layers (LayerNorm, qkv, proj, MLP) stay on the flat sequence;
- gather q, k, v into groups: `q[:, gather].reshape(batch, G, g, heads, d)`;
- attention logits get `table[rel_index]` (the Swin bias table of the effective window) plus an
  additive `where(attn_mask, 0, MASK_VALUE)` with a large *finite* negative value in float32
  (`layers.MASK_VALUE`), never -inf: pad rows have no True entry, so their softmax is uniform
  but finite; pad outputs are never read back, so they get no gradient. Both `[G, g, g]`
  arrays are built on the device from `slot_window` / `slot_pos` (`group_attention_mask`,
  `group_relative_index`), which keeps host planning and host-to-device traffic small;
- scatter back: `out.reshape(batch, G * g, C)[:, slot_of_token]`.
In 'masking' mode (`G = 1`, `g = N_vis`) gather and slot_of_token are the identity. Pads
gather token 0 (a dummy), have window id -1 and are False in `valid` and `attn_mask`.
Between stages, `merge_gather` gives the positions of the 2x2 sub-tokens of every visible
coarse cell (sparse PatchMerging, SPEC 2.4); `models.green_swin.device_plans` turns the output
of `plan_mask` (each plan keeps its tokens' raster `index`) into the model's plan pytree.
Per-mask work only indexes cached per-grid tables (window ids, bias positions, the unit of each
cell, the sub-cells of each coarse cell); counting, packing and slot assignment of a grouping
stage run in one numba-compiled pass (`_grouped_slots`, cached on disk after the first
compile), well under a millisecond per mask for Swin-B/224 (benchmarks/green_vs_dense.py).

Windows follow the official `_get_group_id`: `floor((c + (w - shift) % w) / w)` per axis on the
original stage coordinates, with no cyclic roll. For shift s > 0 the first window row/column is
`[0, s)`, then `[s, s + w)`, ...: exactly Swin's rolled windows split by its region mask.

Tie-break of the knapsack (official `knapsack` backtracking, LayneH/GreenMIM
`modeling/group_window_attention.py`): among all window subsets of maximal total, the official
backtracking walks the items from the last to the first and skips an item whenever the
remaining total is still reachable with earlier items alone. It therefore picks the
colexicographically smallest subset: the smallest largest index, then the smallest second
largest, and so on (not the lexicographically smallest: for counts (1, 2, 2, 3) and capacity 4
it picks windows {1, 2}, not {0, 3}). `max_fill_packing` reproduces this exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence

import numba
import numpy as np

GROUPING = "grouping"
MASKING = "masking"


@dataclasses.dataclass(frozen=True)
class StagePlanSpec:
    """Static shape of the plans of one (stage, shift parity), fixed by the config."""

    resolution: int  # Stage grid side.
    window: int  # Effective window (models.swin.stage_window semantics).
    shift: int  # 0 or window // 2 (0 when resolution <= window).
    num_visible: int  # Visible tokens at this stage (a config constant).
    group_size: int  # g slots per group; num_visible in 'masking' mode.
    num_groups: int  # G groups; 1 in 'masking' mode.
    mode: str  # GROUPING or MASKING (masking iff num_visible <= 2 * window**2).


@dataclasses.dataclass
class StagePlan:
    """Static-shape arrays for one (stage, shift parity) and one mask (slots S = G * g).

    Only per-slot vectors are stored: the `[G, g, g]` attention mask and relative-position
    index follow from `slot_window` and `slot_pos` (`group_attention_mask`,
    `group_relative_index`); the model builds them on the device, so a plan is a few KB.
    """

    gather: np.ndarray  # int32 [S]: token index held by each slot (pads: token 0).
    slot_of_token: np.ndarray  # int32 [N_vis]: the slot of each visible token.
    slot_window: np.ndarray  # int32 [S]: window id of the slot's token; -1 for pads.
    slot_pos: np.ndarray  # int32 [S]: `row * (2w - 1) + col` of the slot's token (pads: 0's).
    num_groups_used: int  # Groups holding real tokens (the first ones); the rest are pads.
    group_size: int  # g.
    window: int  # Effective window w (the bias table is (2w - 1)**2).
    index: np.ndarray | None = None  # int32 [N_vis]: raster index row * resolution + col.
    resolution: int = 0  # Stage grid side.

    @property
    def valid(self) -> np.ndarray:
        """bool [S]: real token (True) or pad."""
        return self.slot_window >= 0

    @property
    def attn_mask(self) -> np.ndarray:
        """bool [G, g, g]: True = may attend (same window, both real)."""
        return group_attention_mask(self.slot_window.reshape(-1, self.group_size))

    @property
    def rel_index(self) -> np.ndarray:
        """int32 [G, g, g]: bias-table index; 0 where attn_mask is False."""
        pos = self.slot_pos.reshape(-1, self.group_size)
        return group_relative_index(pos, self.attn_mask, self.window)


def group_attention_mask(slot_window):
    """`[..., G, g]` slot window ids (-1 = pad) -> bool `[..., G, g, g]` same-window mask.

    Works on numpy and jax arrays: the model calls it inside the jitted step.
    """
    win = slot_window
    return (win[..., :, None] == win[..., None, :]) & (win[..., :, None] >= 0)


def group_relative_index(slot_pos, attn_mask, window: int, xp=np):
    """`[..., G, g]` slot positions and `[..., G, g, g]` mask -> int32 Swin bias-table index.

    `(dy + w - 1) * (2w - 1) + (dx + w - 1)` = `pos_i - pos_j + (w - 1) * 2w` with
    `pos = row * (2w - 1) + col`; 0 where the mask is False.
    """
    pos = slot_pos.astype(xp.int32)
    rel = pos[..., :, None] + (window - 1) * 2 * window - pos[..., None, :]
    return xp.where(attn_mask, rel, 0).astype(xp.int32)


class PlanOverflow(Exception):  # noqa: N818 (the public name the callers use)
    """A mask whose packing does not fit the static plan shape."""


def _per_stage(
    value: int | Sequence[int | None] | None, num_stages: int, name: str
) -> list[int | None]:
    """Broadcasts an int (or None) to every stage, or checks a per-stage sequence."""
    if value is None or isinstance(value, int):
        return [value] * num_stages
    values = list(value)
    if len(values) != num_stages:
        raise ValueError(f"{name} needs one entry per stage ({num_stages}), got {values}")
    return values


def plan_specs(
    *,
    img_size: int,
    patch_size: int,
    depths: Sequence[int],
    window_size: int,
    mask_unit: int,
    mask_ratio: float,
    group_size: int | Sequence[int | None] | None = None,
    num_groups: int | Sequence[int | None] | None = None,
) -> list[list[StagePlanSpec]]:
    """Per stage, `[unshifted]` or `[unshifted, shifted]` plan specs.

    The shifted entry exists when the stage has a shifted block: depth >= 2 and a stage grid
    larger than the window. `group_size` / `num_groups` (an int for every stage, or one entry
    per stage, None = default) apply to 'grouping' stages only. Defaults: `g = window**2` and
    `G = ceil(2 * N_vis / g)`, the max-fill bound (every group but the last is more than half
    full), so no mask ever overflows as long as every window fits in g.
    """
    num_stages = len(depths)
    final_patch = patch_size * 2 ** (num_stages - 1)
    if img_size % mask_unit or mask_unit % final_patch:
        raise ValueError(
            f"mask_unit={mask_unit} must divide img_size={img_size} and be a multiple of the "
            f"final-stage patch {final_patch} (SPEC 2.2)"
        )
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio={mask_ratio} must be in (0, 1)")
    len_keep = int((img_size // mask_unit) ** 2 * (1 - mask_ratio))  # As masking.batchwise_keep.
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no mask unit")
    sizes = _per_stage(group_size, num_stages, "group_size")
    counts = _per_stage(num_groups, num_stages, "num_groups")
    specs = []
    for stage, depth in enumerate(depths):
        stride = patch_size * 2**stage
        resolution = img_size // stride
        num_visible = len_keep * (mask_unit // stride) ** 2
        window = min(resolution, window_size)
        shifts = [0]
        if depth >= 2 and resolution > window_size and window_size // 2 > 0:
            shifts.append(window_size // 2)
        if num_visible <= 2 * window**2:
            mode, g, num = MASKING, num_visible, 1
        else:
            g = sizes[stage] or window**2
            mode, num = GROUPING, counts[stage] or math.ceil(2 * num_visible / g)
        if g < 1 or num < 1:
            raise ValueError(f"stage {stage}: group_size={g} and num_groups={num} must be >= 1")
        specs.append(
            [
                StagePlanSpec(resolution, window, shift, num_visible, g, num, mode)
                for shift in shifts
            ]
        )
    return specs


def window_ids(coords: np.ndarray, window: int, shift: int) -> np.ndarray:
    """int32 `[N]` window id of each `(row, col)` in `coords [N, 2]` (SPEC 2.3 step A).

    Per axis `floor((c + (window - shift) % window) / window)`, no roll; the id is the raster
    index of that (row, col) window pair on a grid of `max(col) // window + 2` window columns
    (enough for any shift), so ids sort in raster window order and are comparable within one
    call.
    """
    coords = np.asarray(coords, np.int32)
    wid = (coords + (window - shift) % window) // window
    return wid[:, 0] * (int(coords[:, 1].max(initial=0)) // window + 2) + wid[:, 1]


@numba.njit(cache=True)
def _pack_kernel(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """`max_fill_packing` core: (group index of each window, number of groups).

    `sizes` int64 `[m]` lie in [1, capacity]. Row j of the subset-sum table `reach` says which
    totals the first j remaining windows can make. The backtracking takes the colex-smallest
    subset, so once a prefix reaches a full group (total `capacity`) the later windows cannot
    be taken and `reach` is not extended past it. Removing a group leaves the rows before its
    first window valid, so the next pass extends `reach` only from there.
    """
    m = sizes.shape[0]
    group = np.empty(m, np.int32)
    remaining = np.arange(m)  # Window index of each remaining position (compacted).
    left = sizes.copy()  # Sizes of the remaining windows.
    reach = np.zeros((m + 1, capacity + 1), np.bool_)
    reach[0, 0] = True
    rows, count, num_groups = 1, m, 0
    taken = np.empty(m, np.int64)
    while count:
        j = rows - 1
        while j < count and not reach[j, capacity]:
            size = left[j]
            for t in range(capacity + 1):
                reach[j + 1, t] = reach[j, t] or (t >= size and reach[j, t - size])
            j += 1
        rows = j + 1
        target = capacity
        while not reach[j, target]:
            target -= 1
        num_taken = 0
        for i in range(rows - 2, -1, -1):
            if target == 0:
                break
            if not reach[i, target]:  # Not reachable without window i: take it.
                taken[num_taken] = i
                num_taken += 1
                target -= left[i]
        for q in range(num_taken):
            group[remaining[taken[q]]] = num_groups
        num_groups += 1
        first = taken[num_taken - 1]
        q, kept = num_taken - 1, first
        for i in range(first, count):  # Drop the taken positions (taken is descending).
            if q >= 0 and i == taken[q]:
                q -= 1
                continue
            remaining[kept] = remaining[i]
            left[kept] = left[i]
            kept += 1
        count, rows = kept, first + 1
    return group, num_groups


def max_fill_packing(counts: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Greedy sequence of 0/1 knapsacks (SPEC 2.3 step C.3), weight = value = count.

    Each pass takes the subset of the remaining windows with the largest total <= capacity;
    among equal totals the colexicographically smallest one, as the official backtracking
    does (module docstring). Returns, per group in packing order, the increasing indices into
    `counts`.
    """
    sizes = np.asarray(counts, np.int64).reshape(-1)
    if ((sizes < 1) | (sizes > capacity)).any():
        raise ValueError(f"counts must lie in [1, capacity={capacity}], got {sizes.tolist()}")
    group, num_groups = _pack_kernel(sizes, capacity)
    order = np.argsort(group, kind="stable")
    return np.split(order, np.cumsum(np.bincount(group, minlength=num_groups))[:-1])


def _window_counts(wid: np.ndarray) -> np.ndarray:
    """int64 token count of each non-empty window, in window-id order."""
    counts = np.bincount(wid)
    return counts[counts > 0]


@numba.njit(cache=True)
def _grouped_slots(
    index: np.ndarray,
    wid_table: np.ndarray,
    num_windows: int,
    pos_table: np.ndarray,
    g: int,
    max_groups: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """The 'grouping' plan arrays of visible tokens `index` (increasing raster indices).

    Non-empty windows in window-id order are packed (`_pack_kernel`); each group holds its
    windows in that order, each window its tokens in raster order. Returns (slot_of_token,
    gather, slot_window, slot_pos, groups used, largest window); the arrays are empty when a
    window exceeds `g` or the packing needs more than `max_groups` groups.
    """
    n = index.shape[0]
    window_of = np.full(num_windows, -1, np.int64)  # Window id -> rank among non-empty ones.
    counts = np.zeros(num_windows, np.int64)
    for t in range(n):
        counts[wid_table[index[t]]] += 1
    m = 0
    for w in range(num_windows):
        if counts[w]:
            window_of[w] = m
            m += 1
    sizes = np.empty(m, np.int64)
    for w in range(num_windows):
        if counts[w]:
            sizes[window_of[w]] = counts[w]
    largest = sizes.max()
    empty = np.empty(0, np.int32)
    if largest > g:
        return empty, empty, empty, empty, 0, largest
    group, used = _pack_kernel(sizes, g)
    if used > max_groups:
        return empty, empty, empty, empty, used, largest
    next_slot = np.arange(used) * g
    first = np.empty(m, np.int64)  # First slot of each window.
    for c in range(m):
        first[c] = next_slot[group[c]]
        next_slot[group[c]] += sizes[c]
    slots = max_groups * g
    slot_of_token = np.empty(n, np.int32)
    gather = np.zeros(slots, np.int32)  # Pads gather token 0 ...
    slot_window = np.full(slots, -1, np.int32)
    slot_pos = np.full(slots, pos_table[index[0]], np.int32)  # ... and keep its position.
    for t in range(n):
        c = window_of[wid_table[index[t]]]
        slot = first[c]
        first[c] += 1
        slot_of_token[t] = slot
        gather[slot] = t
        slot_window[slot] = wid_table[index[t]]
        slot_pos[slot] = pos_table[index[t]]
    return slot_of_token, gather, slot_window, slot_pos, used, largest


@functools.lru_cache(maxsize=256)
def _grid_tables(resolution: int, window: int, shift: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Window id (`window_ids`), the number of window ids, and `slot_pos` value of every cell
    of a stage grid, by raster index: per-mask planning then only indexes these tables."""
    cells = np.arange(resolution * resolution)
    coords = np.stack([cells // resolution, cells % resolution], axis=1)
    wid = window_ids(coords, window, shift)
    wid = wid.astype(np.int32)
    pos = (coords[:, 0] * (2 * window - 1) + coords[:, 1]).astype(np.int32)
    for table in (wid, pos):
        table.setflags(write=False)
    return wid, int(wid.max()) + 1, pos


def _plan_of_index(index: np.ndarray, spec: StagePlanSpec) -> StagePlan:
    """`stage_plan` for visible tokens given by increasing raster indices `index [N_vis]`."""
    n = spec.num_visible
    if index.shape != (n,):
        raise ValueError(f"expected {n} visible tokens for {spec}, got {index.shape}")
    wid_table, num_windows, pos_table = _grid_tables(spec.resolution, spec.window, spec.shift)
    g = spec.group_size
    if spec.mode == MASKING:
        tokens = np.arange(n, dtype=np.int32)
        slot_of_token, gather, used = tokens, tokens, 1
        slot_window, slot_pos = wid_table[index], pos_table[index]
    else:
        slot_of_token, gather, slot_window, slot_pos, used, largest = _grouped_slots(
            index, wid_table, num_windows, pos_table, g, spec.num_groups
        )
        if largest > g:
            raise PlanOverflow(f"a window holds {largest} visible tokens > group_size={g}")
        if used > spec.num_groups:
            raise PlanOverflow(
                f"stage {spec.resolution}x{spec.resolution} shift {spec.shift}: packing needs "
                f"{used} groups > num_groups={spec.num_groups}"
            )
    return StagePlan(
        gather=gather,
        slot_of_token=slot_of_token,
        slot_window=slot_window,
        slot_pos=slot_pos,
        num_groups_used=used,
        group_size=spec.group_size,
        window=spec.window,
        index=index,
        resolution=spec.resolution,
    )


def stage_plan(coords: np.ndarray, spec: StagePlanSpec) -> StagePlan:
    """The plan of one (stage, parity) for visible-token `coords [N_vis, 2]` in raster order.

    Raises PlanOverflow if a window holds more than g tokens or the packing needs more than G
    groups (never with the default g and G).
    """
    coords = np.asarray(coords, np.int32)
    if coords.shape != (spec.num_visible, 2):
        raise ValueError(f"coords must be [{spec.num_visible}, 2] for {spec}, got {coords.shape}")
    return _plan_of_index(coords[:, 0] * spec.resolution + coords[:, 1], spec)


@functools.lru_cache(maxsize=64)
def _sub_cells(coarse_resolution: int) -> np.ndarray:
    """int32 `[R_c**2, 4]`: fine raster indices of each coarse cell's 2x2 sub-tokens in Swin's
    concatenation order x0 = (0, 0), x1 = (1, 0), x2 = (0, 1), x3 = (1, 1) (row, col)."""
    fine = 2 * coarse_resolution
    cells = np.arange(coarse_resolution * coarse_resolution)
    top_left = 2 * (cells // coarse_resolution) * fine + 2 * (cells % coarse_resolution)
    table = (top_left[:, None] + np.array([0, fine, 1, fine + 1])).astype(np.int32)
    table.setflags(write=False)
    return table


def merge_gather(
    fine_index: np.ndarray, fine_resolution: int, coarse_index: np.ndarray
) -> np.ndarray:
    """int32 `[N_coarse, 4]` sparse PatchMerging gather (SPEC 2.4).

    For each visible coarse cell (increasing raster indices `coarse_index` on the half-size
    grid), the positions in the visible fine tokens (increasing raster indices `fine_index`)
    of its 2x2 sub-tokens in Swin's order (`_sub_cells`). Raises ValueError if a sub-token is
    not visible (mask unit not aligned).
    """
    rank = np.full(fine_resolution * fine_resolution, -1, np.int32)
    rank[fine_index] = np.arange(len(fine_index), dtype=np.int32)
    index = rank[_sub_cells(fine_resolution // 2)[coarse_index]]
    if index.min(initial=0) < 0:
        raise ValueError("a visible coarse cell has a masked sub-token (SPEC 2.2 alignment)")
    return index


def visible_coords(unit_mask_keep: np.ndarray, unit_grid: int, stage_resolution: int) -> np.ndarray:
    """int32 `[N_vis, 2]` raster-order `(row, col)` of the visible tokens of a stage.

    `unit_mask_keep [unit_grid**2]` is 1 for a visible mask unit (`1 - mask` of
    masking.batchwise_keep); each unit covers `(stage_resolution / unit_grid)**2` tokens.
    """
    if stage_resolution % unit_grid:
        raise ValueError(f"unit_grid={unit_grid} must divide stage_resolution={stage_resolution}")
    scale = stage_resolution // unit_grid
    keep = np.asarray(unit_mask_keep).reshape(unit_grid, unit_grid).astype(bool)
    grid = np.repeat(np.repeat(keep, scale, axis=0), scale, axis=1)
    return np.argwhere(grid).astype(np.int32)


@functools.lru_cache(maxsize=64)
def _unit_of_cell(unit_grid: int, resolution: int) -> np.ndarray:
    """int32 `[resolution**2]`: the mask unit (raster index on the unit grid) of each cell."""
    if resolution % unit_grid:
        raise ValueError(f"unit_grid={unit_grid} must divide stage_resolution={resolution}")
    unit_rows = np.arange(resolution) // (resolution // unit_grid)
    table = (unit_rows[:, None] * unit_grid + unit_rows[None, :]).reshape(-1).astype(np.int32)
    table.setflags(write=False)
    return table


def plan_mask(
    keep_units: np.ndarray, specs: list[list[StagePlanSpec]], unit_grid: int
) -> list[list[StagePlan]]:
    """Plans of every stage and parity (shaped like `specs`) for one batch-wise keep mask."""
    keep = np.asarray(keep_units).reshape(-1).astype(bool)
    plans = []
    for stage in specs:
        visible = keep[_unit_of_cell(unit_grid, stage[0].resolution)]
        index = np.flatnonzero(visible).astype(np.int32)
        plans.append([_plan_of_index(index, spec) for spec in stage])
    return plans


def search_group_size(
    masks: np.ndarray,
    *,
    resolution: int,
    window: int,
    shift: int,
    num_visible: int,
    channels: int,
    candidates: Iterable[int],
) -> dict[int, float]:
    """The paper's group-size search: mean attention cost per candidate g (SPEC 2.3 note).

    `masks [num_masks, unit_grid**2]` are unit keep masks (1 = visible). The cost of one mask
    is `n_groups(g) * (4 g C**2 + 2 g**2 C)` with n_groups from `max_fill_packing`; it is
    infinite when some window holds more than g tokens.
    """
    masks = np.asarray(masks)
    unit_grid = math.isqrt(masks.shape[1])
    if unit_grid**2 != masks.shape[1]:
        raise ValueError(f"masks must be [num_masks, square unit count], got {masks.shape}")
    window_counts = []
    for keep in masks:
        coords = visible_coords(keep, unit_grid, resolution)
        if len(coords) != num_visible:
            raise ValueError(f"a mask has {len(coords)} visible tokens, expected {num_visible}")
        window_counts.append(_window_counts(window_ids(coords, window, shift)))
    costs = {}
    for g in candidates:
        per_group = 4 * g * channels**2 + 2 * g**2 * channels
        total = 0.0
        for counts in window_counts:
            if max(counts) > g:
                total = math.inf
                break
            total += _pack_kernel(counts, g)[1] * per_group
        costs[g] = total / len(masks)
    return costs
