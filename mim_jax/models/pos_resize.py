"""Position-table resizing for fine-tuning key surgery (host side, numpy/scipy).

When a checkpoint is fine-tuned at another window or patch-grid size, its position tables must
be resized before loading:

- relative position bias tables (Swin/HiViT `[(2S-1)^2, heads]`, BEiT/SimMIM-ViT with extra
  cls rows) follow the official SimMIM `remap_pretrained_keys_*`: a cubic interpolating spline
  per head over geometric-progression source offsets, sampled at the integer target offsets;
- absolute position embeddings `[num_extra + S*S, channels]` follow MAE's
  `interpolate_pos_embed` (PyTorch bicubic, align_corners=False, a = -0.75).

Relative tables are row-major `[(2S-1), (2S-1)]` per head: row (dy + S - 1) * (2S - 1) +
(dx + S - 1). Inputs and outputs are float32; the arithmetic runs in float64.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.interpolate import RectBivariateSpline

CUBIC_A = -0.75  # PyTorch's bicubic convolution coefficient.


def _square_side(rows: int, what: str) -> int:
    """Side of a square of `rows` cells; ValueError when `rows` is not a perfect square."""
    side = math.isqrt(rows) if rows > 0 else 0
    if side == 0 or side * side != rows:
        raise ValueError(f"{what}: {rows} rows is not a square number of positions")
    return side


def _check_2d(array: np.ndarray, name: str) -> np.ndarray:
    """Returns `array` as float64 `[rows, columns]`; ValueError for any other rank."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, columns], got shape {array.shape}")
    return array.astype(np.float64)


def _geometric_offsets(src_side: int, dst_side: int) -> np.ndarray:
    """Source offsets -dis..0..dis whose gaps grow geometrically so that the outermost lands
    near the target's outermost offset; the ratio q is bisected in [1.01, 1.5] as in SimMIM."""
    half_src, half_dst = src_side // 2, dst_side // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q**half_src) / (1.0 - q) > half_dst:
            right = q
        else:
            left = q
    dis = np.cumsum(np.concatenate([[1.0], q ** np.arange(1, half_src)]))
    return np.concatenate([-dis[::-1], [0.0], dis])


def resize_rel_pos_table(table: np.ndarray, dst_window: int) -> np.ndarray:
    """Resizes a relative position bias table `[(2S-1)^2, heads]` to `[(2D-1)^2, heads]` with
    D = `dst_window`; an unchanged size returns a copy as is (as the official code does)."""
    grid = _check_2d(table, "relative position table")
    if dst_window < 1:
        raise ValueError(f"dst_window must be >= 1, got {dst_window}")
    src_side = _square_side(grid.shape[0], "relative position table")
    if src_side % 2 == 0:
        raise ValueError(f"relative position table side {src_side} is not 2 * window - 1")
    dst_side = 2 * dst_window - 1
    if src_side == dst_side:
        return np.array(table, dtype=np.float32)
    if src_side < 5:
        raise ValueError(f"cubic resize needs a source window >= 3, got {(src_side + 1) // 2}")
    x = _geometric_offsets(src_side, dst_side)
    t = dst_side // 2
    dx = np.arange(-t, t + 1, dtype=np.float64)
    heads = [
        RectBivariateSpline(x, x, grid[:, h].reshape(src_side, src_side), kx=3, ky=3, s=0)(dx, dx)
        for h in range(grid.shape[1])
    ]
    return np.stack([z.reshape(-1) for z in heads], axis=1).astype(np.float32)


def resize_rel_pos_table_with_extra(
    table: np.ndarray, dst_grid: int, num_extra: int = 3
) -> np.ndarray:
    """Resizes a BEiT/SimMIM-ViT table `[(2S-1)^2 + num_extra, heads]` to
    `[(2D-1)^2 + num_extra, heads]` (D = `dst_grid`): the grid rows are resized, the last
    `num_extra` rows (cls-to-token, token-to-cls, cls-to-cls) are kept as they are."""
    array = np.asarray(table)
    _check_2d(array, "relative position table")
    if not 0 <= num_extra < array.shape[0]:
        raise ValueError(f"num_extra={num_extra} must be in [0, {array.shape[0]})")
    split = array.shape[0] - num_extra
    grid = resize_rel_pos_table(array[:split], dst_grid)
    return np.concatenate([grid, array[split:].astype(np.float32)], axis=0)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Cubic-convolution weights `[n, 4]` for taps at offsets -1, 0, 1, 2 from the floor index,
    given the fractional positions `t` `[n]` (Keys' kernel with a = CUBIC_A)."""
    a = CUBIC_A
    dist = np.abs(t[:, None] - np.arange(-1, 3)[None, :])
    near = ((a + 2) * dist - (a + 3)) * dist * dist + 1
    far = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
    return np.where(dist <= 1, near, np.where(dist < 2, far, 0.0))


def _bicubic_matrix(src: int, dst: int) -> np.ndarray:
    """The `[dst, src]` matrix of a 1-D PyTorch-style bicubic resize (align_corners=False):
    source coordinate (i + 0.5) * src / dst - 0.5, taps clamped to the border."""
    coord = (np.arange(dst) + 0.5) * (src / dst) - 0.5
    base = np.floor(coord)
    weights = _cubic_weights(coord - base)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, src - 1)
    matrix = np.zeros((dst, src))
    np.add.at(matrix, (np.repeat(np.arange(dst), 4), taps.reshape(-1)), weights.reshape(-1))
    return matrix


def resize_abs_pos_embed(pos: np.ndarray, dst_grid: int, num_extra: int = 0) -> np.ndarray:
    """Resizes an absolute position embedding `[num_extra + S*S, channels]` to
    `[num_extra + D*D, channels]` (D = `dst_grid`): the first `num_extra` rows (cls tokens) are
    kept, the grid is resized like torch bicubic interpolation with align_corners=False (MAE's
    `interpolate_pos_embed`). An unchanged size returns a copy as is."""
    array = _check_2d(pos, "position embedding")
    if dst_grid < 1:
        raise ValueError(f"dst_grid must be >= 1, got {dst_grid}")
    if not 0 <= num_extra < array.shape[0]:
        raise ValueError(f"num_extra={num_extra} must be in [0, {array.shape[0]})")
    src = _square_side(array.shape[0] - num_extra, "position embedding grid")
    if src == dst_grid:
        return np.array(pos, dtype=np.float32)
    grid = array[num_extra:].reshape(src, src, -1)
    matrix = _bicubic_matrix(src, dst_grid)
    resized = np.einsum("ys,xt,stc->yxc", matrix, matrix, grid).reshape(dst_grid * dst_grid, -1)
    return np.concatenate([array[:num_extra], resized], axis=0).astype(np.float32)
