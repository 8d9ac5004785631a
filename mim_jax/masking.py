"""Host-side mask generators: SimMIM per-sample, GreenMIM batch-wise, iTPN/MAE per-sample.

Every mask is a pure function of `(seed, step, example or mask-group id)` (SPEC 0): nothing
depends on the device count, the host count, the process id or the call history, so every host
computes identical masks and a resumed run gets the same ones. Randomness comes from a
counter-based hash (the splitmix64 finalizer) over uint64 words, so a batch of masks is a few
vectorized numpy passes with no per-example loop. Each generator hashes its own stream tag, so
for the same ids the SimMIM, batch-wise and per-sample masks are independent.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import ml_collections

# Stream tags mixed into the hash: one per generator (0 is the generic stream).
STREAM_GENERIC = 0
STREAM_SIMMIM = 1
STREAM_BATCHWISE = 2
STREAM_RANDOM = 3

_MASK64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64 increment (golden ratio * 2**64).
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_HIGH53 = np.uint64(_MASK64 ^ 0x7FF)  # The 53 bits uniform_noise keeps.
_MAX_COLUMNS = 0x800  # Column indices fill the 11 low bits of a sort key.


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijective avalanche hash of each uint64 word."""
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def _absorb(h: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Hashes word(s) `x` into state(s) `h` (broadcasting); injective in `x` for a fixed `h`."""
    return _mix(h ^ _mix(x + _GAMMA))


def _mix_int(z: int) -> int:
    """`_mix` of one word held as a Python int in [0, 2**64) (no numpy call overhead)."""
    z = ((z ^ (z >> 30)) * int(_MUL1)) & _MASK64
    z = ((z ^ (z >> 27)) * int(_MUL2)) & _MASK64
    return z ^ (z >> 31)


def _absorb_int(h: int, value: int) -> int:
    """`_absorb` of Python ints; `value` of any sign wraps modulo 2**64."""
    return _mix_int(h ^ _mix_int((int(value) + int(_GAMMA)) & _MASK64))


def _ids(example_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(example_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64).view(np.uint64)


def _hash_bits(stream: int, seed: int, step: int, example_ids: np.ndarray, num: int) -> np.ndarray:
    """uint64 `[len(example_ids), num]`: entry `[i, j]` hashes (stream, seed, step, id_i, j)."""
    prefix = _absorb_int(_absorb_int(_mix_int((stream + int(_GAMMA)) & _MASK64), seed), step)
    key = _absorb(np.uint64(prefix), _ids(example_ids))
    return _absorb(key[:, None], np.arange(num, dtype=np.uint64)[None, :])


def uniform_noise(
    seed: int, step: int, example_ids: np.ndarray, num: int, *, stream: int = STREAM_GENERIC
) -> np.ndarray:
    """Uniform floats in [0, 1) with 53-bit resolution, float64 `[len(example_ids), num]`.

    Entry `[i, j]` is a pure function of `(stream, seed, step, example_ids[i], j)`.
    """
    bits = _hash_bits(stream, seed, step, example_ids, num)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _first_of_permutation(
    stream: int, seed: int, step: int, example_ids: np.ndarray, num: int, count: int
) -> np.ndarray:
    """bool `[batch, num]`: True at the first `count` entries of each row's random permutation.

    The permutation is the stable argsort of the row of `uniform_noise(..., stream=stream)`.
    Sort keys are the noise's 53 bits above the column index, hence unique within a row, so
    a partition (O(num), and independent of the sort algorithm) finds the same set.
    """
    if num > _MAX_COLUMNS:
        raise ValueError(f"at most {_MAX_COLUMNS} mask units per row, got {num}")
    bits = _hash_bits(stream, seed, step, example_ids, num)
    keys = (bits & _HIGH53) | np.arange(num, dtype=np.uint64)
    threshold = np.partition(keys, count - 1, axis=1)[:, count - 1 : count]
    return keys <= threshold


def _check_ratio(mask_ratio: float) -> None:
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio={mask_ratio} must be in (0, 1)")


def _check_simmim_sizes(
    input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float
) -> None:
    if min(input_size, mask_patch_size, model_patch_size) <= 0:
        raise ValueError(
            f"sizes must be positive: input_size={input_size}, "
            f"mask_patch_size={mask_patch_size}, model_patch_size={model_patch_size}"
        )
    if input_size % mask_patch_size:
        raise ValueError(
            f"input_size={input_size} must be divisible by mask_patch_size={mask_patch_size}"
        )
    if mask_patch_size % model_patch_size:
        raise ValueError(
            f"mask_patch_size={mask_patch_size} must be divisible by "
            f"model_patch_size={model_patch_size}"
        )
    _check_ratio(mask_ratio)


def simmim_masks(
    seed: int,
    step: int,
    example_ids: np.ndarray,
    *,
    input_size: int,
    mask_patch_size: int,
    model_patch_size: int,
    mask_ratio: float,
) -> np.ndarray:
    """SimMIM masks (SPEC 1.1), int32 `[batch, grid, grid]` with grid = input // model_patch.

    1 = masked. Each image masks `ceil(rand_size**2 * mask_ratio)` of its `rand_size**2` mask
    patches (the first ones of a uniform random permutation), each upsampled to a
    `scale x scale` block of model patches.
    """
    _check_simmim_sizes(input_size, mask_patch_size, model_patch_size, mask_ratio)
    rand_size = input_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    token_count = rand_size**2
    mask_count = math.ceil(token_count * mask_ratio)
    masked = _first_of_permutation(STREAM_SIMMIM, seed, step, example_ids, token_count, mask_count)
    units = masked.astype(np.int32).reshape(-1, rand_size, rand_size)
    return np.repeat(np.repeat(units, scale, axis=2), scale, axis=1)


@dataclasses.dataclass(frozen=True)
class SimMIMMaskGenerator:
    """SimMIM masks for a config: `generator(step, example_ids) -> [batch, grid, grid]` int32."""

    seed: int
    input_size: int
    mask_patch_size: int
    model_patch_size: int
    mask_ratio: float

    def __post_init__(self) -> None:
        _check_simmim_sizes(
            self.input_size, self.mask_patch_size, self.model_patch_size, self.mask_ratio
        )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> SimMIMMaskGenerator:
        """Reads `seed`, `model.img_size`, `model.patch_size`, `mask.patch_size`, `mask.ratio`."""
        return cls(
            seed=config.seed,
            input_size=config.model.img_size,
            mask_patch_size=config.mask.patch_size,
            model_patch_size=config.model.patch_size,
            mask_ratio=config.mask.ratio,
        )

    @property
    def grid_size(self) -> int:
        """Side of the mask on the model-patch grid."""
        return self.input_size // self.model_patch_size

    def __call__(self, step: int, example_ids: np.ndarray) -> np.ndarray:
        return simmim_masks(
            self.seed,
            step,
            example_ids,
            input_size=self.input_size,
            mask_patch_size=self.mask_patch_size,
            model_patch_size=self.model_patch_size,
            mask_ratio=self.mask_ratio,
        )


def _keep(
    stream: int, seed: int, step: int, ids: np.ndarray, num_units: int, mask_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """MAE-style keep: the first `int(num_units * (1 - ratio))` of a random permutation."""
    _check_ratio(mask_ratio)
    len_keep = int(num_units * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"num_units={num_units} with mask_ratio={mask_ratio} keeps no unit")
    keep = _first_of_permutation(stream, seed, step, ids, num_units, len_keep)
    ids_keep = np.flatnonzero(keep).reshape(-1, len_keep) % num_units
    mask = (~keep).astype(np.int32)
    return mask, ids_keep.astype(np.int32)


def batchwise_keep(
    seed: int, step: int, group_ids: np.ndarray, *, num_units: int, mask_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """GreenMIM batch-wise masking (SPEC 2.1): one mask per mask group on the unit grid.

    Returns `mask` int32 `[groups, num_units]` (1 = removed) and `ids_keep` int32
    `[groups, len_keep]` in raster order, `len_keep = int(num_units * (1 - mask_ratio))`.
    Every image of a group shares the group's mask.
    """
    return _keep(STREAM_BATCHWISE, seed, step, group_ids, num_units, mask_ratio)


def random_keep(
    seed: int, step: int, example_ids: np.ndarray, *, num_units: int, mask_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """iTPN/MAE per-sample masking (SPEC 3.3): one mask per example.

    Returns `mask` int32 `[batch, num_units]` (1 = removed) and `ids_keep` int32
    `[batch, len_keep]` in raster order, `len_keep = int(num_units * (1 - mask_ratio))`.
    """
    return _keep(STREAM_RANDOM, seed, step, example_ids, num_units, mask_ratio)
