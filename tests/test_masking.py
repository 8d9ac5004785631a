"""Tests for mim_jax.masking against independent per-example numpy references."""

import itertools
import math
import time

import ml_collections
import numpy as np
import pytest

from mim_jax import masking

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15

# (input_size, mask_patch_size, model_patch_size, mask_ratio, grid, masked units, units)
SIMMIM_CASES = [
    (192, 32, 4, 0.6, 48, 22, 36),  # Swin-192
    (224, 32, 16, 0.6, 14, 30, 49),  # ViT-224
    (64, 32, 4, 0.6, 16, 3, 4),  # tiny
]


def _splitmix(z: int) -> int:
    """splitmix64 finalizer on a Python int (written out, no numpy)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _reference_noise(stream: int, seed: int, step: int, example_id: int, column: int) -> float:
    """The documented hash chain: stream -> seed -> step -> id -> column, top 53 bits."""
    h = _splitmix((stream + _GAMMA) & _M64)
    for word in (seed, step, example_id, column):
        h = _splitmix(h ^ _splitmix(((word & _M64) + _GAMMA) & _M64))
    return (h >> 11) / 2.0**53


def _reference_simmim(noise: np.ndarray, input_size, mask_patch, model_patch, ratio):
    """SPEC 1.1 one image at a time: argsort -> first mask_count -> reshape -> kron upsample."""
    rand_size = input_size // mask_patch
    scale = mask_patch // model_patch
    mask_count = int(np.ceil(rand_size**2 * ratio))
    out = []
    for row in noise:
        flat = np.zeros(rand_size**2, dtype=int)
        flat[np.argsort(row, kind="stable")[:mask_count]] = 1
        out.append(np.kron(flat.reshape(rand_size, rand_size), np.ones((scale, scale), int)))
    return np.stack(out)


def _reference_keep(noise: np.ndarray, mask_ratio: float):
    """MAE random_masking one row at a time: keep the first int(N * (1 - r)) of argsort."""
    num_units = noise.shape[1]
    len_keep = int(num_units * (1 - mask_ratio))
    masks, kept = [], []
    for row in noise:
        keep = np.sort(np.argsort(row, kind="stable")[:len_keep])
        mask = np.ones(num_units, dtype=int)
        mask[keep] = 0
        masks.append(mask)
        kept.append(keep)
    return np.stack(masks), np.stack(kept)


def _simmim(seed, step, ids, case):
    input_size, mask_patch, model_patch, ratio = case[:4]
    return masking.simmim_masks(
        seed,
        step,
        ids,
        input_size=input_size,
        mask_patch_size=mask_patch,
        model_patch_size=model_patch,
        mask_ratio=ratio,
    )


# --- noise ----------------------------------------------------------------------------------


def test_noise_matches_written_out_hash():
    ids = np.array([0, 1, 7, -3, 2**40 + 5])
    for stream, seed, step in [(0, 0, 0), (masking.STREAM_SIMMIM, 42, 1000), (3, -1, 2**33)]:
        noise = masking.uniform_noise(seed, step, ids, 5, stream=stream)
        expected = [
            [_reference_noise(stream, seed, step, int(i), j) for j in range(5)] for i in ids
        ]
        np.testing.assert_array_equal(noise, np.array(expected))


def test_noise_shape_range_and_purity():
    ids = np.arange(100, 164)
    noise = masking.uniform_noise(3, 9, ids, 40)
    assert noise.shape == (64, 40) and noise.dtype == np.float64
    assert noise.min() >= 0.0 and noise.max() < 1.0
    # Entry [i, j] depends only on (seed, step, id, column): not on the batch or on `num`.
    np.testing.assert_array_equal(masking.uniform_noise(3, 9, ids, 12), noise[:, :12])
    np.testing.assert_array_equal(masking.uniform_noise(3, 9, ids[::-1], 40), noise[::-1])
    np.testing.assert_array_equal(masking.uniform_noise(3, 9, ids[5:6], 40), noise[5:6])
    np.testing.assert_array_equal(masking.uniform_noise(3, 9, ids.astype(np.int32), 40), noise)
    assert not np.array_equal(masking.uniform_noise(3, 10, ids, 40), noise)
    assert not np.array_equal(masking.uniform_noise(4, 9, ids, 40), noise)
    assert not np.array_equal(masking.uniform_noise(3, 9, ids, 40, stream=1), noise)


def test_noise_is_uniform():
    noise = masking.uniform_noise(0, 0, np.arange(4096), 64)
    assert abs(noise.mean() - 0.5) < 0.005
    assert abs(noise.var() - 1 / 12) < 0.002
    counts = np.histogram(noise, bins=32, range=(0, 1))[0]
    expected = noise.size / 32
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 80, chi2  # 31 degrees of freedom: mean 31, p(chi2 > 80) ~ 3e-6.
    # Neighbouring columns, neighbouring ids and different streams are uncorrelated.
    other = masking.uniform_noise(0, 0, np.arange(4096), 64, stream=masking.STREAM_SIMMIM)
    for a, b in [(noise[:, :-1], noise[:, 1:]), (noise[:-1], noise[1:]), (noise, other)]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02


def test_noise_rejects_bad_ids():
    with pytest.raises(ValueError, match="1-D integer"):
        masking.uniform_noise(0, 0, np.zeros((2, 2), int), 4)
    with pytest.raises(ValueError, match="1-D integer"):
        masking.uniform_noise(0, 0, np.array([0.5, 1.5]), 4)


# --- SimMIM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SIMMIM_CASES)
def test_simmim_matches_reference(case):
    input_size, mask_patch, model_patch, ratio, grid, masked, units = case
    ids = np.arange(64) * 7 + 3
    masks = _simmim(11, 5, ids, case)
    assert masks.shape == (64, grid, grid) and masks.dtype == np.int32
    noise = masking.uniform_noise(11, 5, ids, units, stream=masking.STREAM_SIMMIM)
    expected = _reference_simmim(noise, input_size, mask_patch, model_patch, ratio)
    np.testing.assert_array_equal(masks, expected)

    scale = mask_patch // model_patch
    assert masked == math.ceil(units * ratio)
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), masked * scale**2)
    assert set(np.unique(masks)) == {0, 1}
    # Every scale x scale block of model patches is one mask patch: constant.
    blocks = masks.reshape(64, grid // scale, scale, grid // scale, scale)
    assert (blocks.min(axis=(2, 4)) == blocks.max(axis=(2, 4))).all()
    np.testing.assert_array_equal(blocks[:, :, 0, :, 0].sum(axis=(1, 2)), masked)


def test_simmim_deterministic_and_batch_independent():
    case = SIMMIM_CASES[0]
    ids = np.arange(1000, 1032)
    masks = _simmim(0, 17, ids, case)
    np.testing.assert_array_equal(_simmim(0, 17, ids, case), masks)
    perm = np.random.default_rng(0).permutation(32)
    np.testing.assert_array_equal(_simmim(0, 17, ids[perm], case), masks[perm])
    np.testing.assert_array_equal(_simmim(0, 17, ids[7:9], case), masks[7:9])
    np.testing.assert_array_equal(_simmim(0, 17, [1003], case), masks[3:4])
    mixed = np.array([5, 1010, 99999, 1020])
    np.testing.assert_array_equal(_simmim(0, 17, mixed, case)[[1, 3]], masks[[10, 20]])


def test_simmim_varies_across_examples_steps_and_seeds():
    case = SIMMIM_CASES[0]
    ids = np.arange(256)
    masks = _simmim(0, 0, ids, case)
    units = masks[:, ::8, ::8].reshape(256, -1)
    assert len({row.tobytes() for row in units}) == 256
    assert (_simmim(0, 1, ids, case) != masks).any(axis=(1, 2)).mean() > 0.99
    assert (_simmim(1, 0, ids, case) != masks).any(axis=(1, 2)).mean() > 0.99


def test_simmim_masks_every_unit_equally_often():
    case = SIMMIM_CASES[0]
    n = 8192
    units = _simmim(3, 0, np.arange(n), case)[:, ::8, ::8].reshape(n, 36)
    freq = units.mean(axis=0)
    # Each unit is masked with probability 22/36; std of the mean ~0.0054 at n = 8192.
    assert np.abs(freq - 22 / 36).max() < 0.03, freq
    # Tiny case: each of the C(4, 3) = 4 masks is about equally likely.
    tiny = _simmim(3, 0, np.arange(4000), SIMMIM_CASES[2])[:, ::8, ::8].reshape(4000, 4)
    counts = np.array([(tiny == 1 - np.eye(4, dtype=int)[k]).all(axis=1).sum() for k in range(4)])
    assert counts.sum() == 4000 and np.abs(counts - 1000).max() < 120, counts


@pytest.mark.parametrize(
    ("input_size", "mask_patch", "model_patch", "ratio", "match"),
    [
        (200, 32, 4, 0.6, "input_size=200 must be divisible"),
        (192, 32, 6, 0.6, "mask_patch_size=32 must be divisible"),
        (192, 0, 4, 0.6, "positive"),
        (192, 32, 4, 0.0, "mask_ratio"),
        (192, 32, 4, 1.0, "mask_ratio"),
    ],
)
def test_simmim_rejects_bad_sizes(input_size, mask_patch, model_patch, ratio, match):
    with pytest.raises(ValueError, match=match):
        _simmim(0, 0, np.arange(2), (input_size, mask_patch, model_patch, ratio))
    with pytest.raises(ValueError, match=match):
        masking.SimMIMMaskGenerator(0, input_size, mask_patch, model_patch, ratio)


def test_generator_from_config():
    config = ml_collections.ConfigDict(
        dict(
            seed=7,
            model=dict(img_size=224, patch_size=16),
            mask=dict(patch_size=32, ratio=0.6),
        )
    )
    generator = masking.SimMIMMaskGenerator.from_config(config)
    assert generator.grid_size == 14
    ids = np.arange(16)
    np.testing.assert_array_equal(generator(3, ids), _simmim(7, 3, ids, SIMMIM_CASES[1]))
    config.model.patch_size = 12
    with pytest.raises(ValueError, match="divisible"):
        masking.SimMIMMaskGenerator.from_config(config)


def test_simmim_timing():
    ids = np.arange(2048)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        _simmim(0, 1, ids, SIMMIM_CASES[0])
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"2048 SimMIM masks at 192 px took {best:.3f} s"


# --- GreenMIM batch-wise and iTPN/MAE per-sample keep ---------------------------------------

KEEP_FNS = [
    (masking.batchwise_keep, masking.STREAM_BATCHWISE),
    (masking.random_keep, masking.STREAM_RANDOM),
]


@pytest.mark.parametrize(("fn", "stream"), KEEP_FNS)
@pytest.mark.parametrize(("num_units", "ratio", "len_keep"), [(49, 0.75, 12), (196, 0.75, 49)])
def test_keep_matches_reference(fn, stream, num_units, ratio, len_keep):
    ids = np.arange(8, 72)
    mask, ids_keep = fn(5, 2, ids, num_units=num_units, mask_ratio=ratio)
    assert mask.shape == (64, num_units) and mask.dtype == np.int32
    assert ids_keep.shape == (64, len_keep) and ids_keep.dtype == np.int32
    noise = masking.uniform_noise(5, 2, ids, num_units, stream=stream)
    ref_mask, ref_keep = _reference_keep(noise, ratio)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(ids_keep, ref_keep)
    # Raster order, exact counts, and the mask is 0 exactly at ids_keep.
    assert (np.diff(ids_keep, axis=1) > 0).all()
    np.testing.assert_array_equal(mask.sum(axis=1), num_units - len_keep)
    np.testing.assert_array_equal(np.take_along_axis(mask, ids_keep, axis=1), 0)


@pytest.mark.parametrize(("fn", "stream"), KEEP_FNS)
def test_keep_deterministic_batch_independent_and_varied(fn, stream):
    del stream
    ids = np.arange(512)
    mask, ids_keep = fn(0, 4, ids, num_units=49, mask_ratio=0.75)
    again = fn(0, 4, ids, num_units=49, mask_ratio=0.75)
    np.testing.assert_array_equal(again[0], mask)
    np.testing.assert_array_equal(again[1], ids_keep)
    sub_mask, sub_keep = fn(0, 4, ids[[300, 2, 77]], num_units=49, mask_ratio=0.75)
    np.testing.assert_array_equal(sub_mask, mask[[300, 2, 77]])
    np.testing.assert_array_equal(sub_keep, ids_keep[[300, 2, 77]])
    assert len({row.tobytes() for row in mask}) == 512
    assert not np.array_equal(fn(0, 5, ids, num_units=49, mask_ratio=0.75)[0], mask)
    # Each unit is kept with probability 12/49 (std of the mean ~0.019 at 512 rows).
    assert np.abs((1 - mask).mean(axis=0) - 12 / 49).max() < 0.1


def test_streams_are_independent():
    ids = np.arange(64)
    batchwise = masking.batchwise_keep(0, 0, ids, num_units=36, mask_ratio=0.6)[0]
    per_sample = masking.random_keep(0, 0, ids, num_units=36, mask_ratio=0.6)[0]
    simmim = _simmim(0, 0, ids, SIMMIM_CASES[0])[:, ::8, ::8].reshape(64, 36)
    # All three remove 22 of 36 units, yet give different masks for every id.
    for a, b in itertools.combinations([batchwise, per_sample, simmim], 2):
        np.testing.assert_array_equal(a.sum(axis=1), b.sum(axis=1))
        assert (a != b).any(axis=1).all()


@pytest.mark.parametrize("fn", [masking.batchwise_keep, masking.random_keep])
def test_keep_rejects_bad_arguments(fn):
    with pytest.raises(ValueError, match="mask_ratio"):
        fn(0, 0, np.arange(2), num_units=49, mask_ratio=1.0)
    with pytest.raises(ValueError, match="keeps no unit"):
        fn(0, 0, np.arange(2), num_units=4, mask_ratio=0.9)
    with pytest.raises(ValueError, match="at most"):
        fn(0, 0, np.arange(2), num_units=4096, mask_ratio=0.5)
