"""Tests for the fine-tuning augmentation: RandAugment ops and policy, color jitter,
random erasing, the eval transform, and finetune_augment.

Expected values are hand-computed from timm 0.4.12's level -> argument mappings and from numpy
statements of what each op does, not from the code under test.
"""

import math

import numpy as np
import pytest
from PIL import Image

from mim_jax.data import augment
from mim_jax.data import rand_augment as ra

BICUBIC = Image.Resampling.BICUBIC
FILL = (124, 116, 104)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def _noise(seed=0, shape=(24, 32, 3), low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, shape, dtype=np.uint8)


def _op(pixels, name, level, negate=False):
    out = ra.apply_op(
        Image.fromarray(pixels), name, level, negate=negate, fill=FILL, interpolation=BICUBIC
    )
    return np.asarray(out).astype(int)


# Hand-computed from timm: Posterize int(level / 10 * 4), increasing 4 - that.
@pytest.mark.parametrize(
    "name,level,bits",
    [
        ("Posterize", 0, 0),
        ("Posterize", 5, 2),
        ("Posterize", 9, 3),
        ("Posterize", 10, 4),
        ("PosterizeIncreasing", 0, 4),
        ("PosterizeIncreasing", 5, 2),
        ("PosterizeIncreasing", 9, 1),
        ("PosterizeIncreasing", 10, 0),
    ],
)
def test_posterize_keeps_top_bits(name, level, bits):
    x = _noise()
    mask = (0xFF << (8 - bits)) & 0xFF
    np.testing.assert_array_equal(_op(x, name, level), x & mask)


# Solarize threshold int(level / 10 * 256); increasing 256 - that (9 -> 256 - 230 = 26).
@pytest.mark.parametrize(
    "name,level,threshold",
    [
        ("Solarize", 5, 128),
        ("Solarize", 0, 0),
        ("SolarizeIncreasing", 9, 26),
        ("SolarizeIncreasing", 0, 256),
    ],
)
def test_solarize_inverts_at_or_above_threshold(name, level, threshold):
    x = _noise().astype(int)
    np.testing.assert_array_equal(
        _op(x.astype(np.uint8), name, level), np.where(x >= threshold, 255 - x, x)
    )


@pytest.mark.parametrize("level,amount", [(9, 99), (5, 55), (0, 0), (10, 110)])
def test_solarize_add_below_128(level, amount):
    x = _noise().astype(int)
    expected = np.where(x < 128, np.minimum(x + amount, 255), x)
    np.testing.assert_array_equal(_op(x.astype(np.uint8), "SolarizeAdd", level), expected)


def test_invert():
    x = _noise()
    np.testing.assert_array_equal(_op(x, "Invert", 7), 255 - x.astype(int))


def test_autocontrast_stretches_each_channel():
    x = _noise(low=40, high=180).astype(int)
    x[0, 0] = (40, 60, 90)  # Per-channel minima/maxima differ.
    x[0, 1] = (179, 120, 170)
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    expected = (x - lo) * 255.0 / (hi - lo)
    out = _op(x.astype(np.uint8), "AutoContrast", 3)
    assert np.abs(out - expected).max() <= 1.0
    np.testing.assert_array_equal(out.min(axis=(0, 1)), 0)
    np.testing.assert_array_equal(out.max(axis=(0, 1)), 255)


def test_equalize_matches_histogram_equalization():
    x = _noise(low=0, high=90)
    out = _op(x, "Equalize", 3)
    for c in range(3):
        hist = np.bincount(x[..., c].ravel(), minlength=256)
        last = hist[np.nonzero(hist)[0][-1]]
        step = (hist.sum() - last) // 255
        cdf_before = np.concatenate([[0], np.cumsum(hist)[:-1]])
        lut = np.minimum((step // 2 + cdf_before) // step, 255)
        np.testing.assert_array_equal(out[..., c], lut[x[..., c]])


@pytest.mark.parametrize(
    "name,level,negate,arg",
    [
        ("Color", 9, False, 1.72),
        ("Contrast", 0, False, 0.1),
        ("Brightness", 10, False, 1.9),
        ("ColorIncreasing", 9, False, 1.81),
        ("ContrastIncreasing", 9, True, 0.19),
        ("BrightnessIncreasing", 0, True, 1.0),
        ("SharpnessIncreasing", 10, True, 0.1),
        ("Rotate", 9, True, -27.0),
        ("ShearX", 5, False, 0.15),
        ("TranslateYRel", 10, True, -0.45),
    ],
)
def test_level_to_argument(name, level, negate, arg):
    op = ra.OPS[name]
    assert op.arg(level, -1.0 if negate else 1.0) == pytest.approx(arg)


def test_signed_ops_are_the_geometric_and_increasing_enhance_ops():
    signed = {name for name, op in ra.OPS.items() if op.signed}
    assert signed == {
        "Rotate",
        "ShearX",
        "ShearY",
        "TranslateXRel",
        "TranslateYRel",
        "ColorIncreasing",
        "ContrastIncreasing",
        "BrightnessIncreasing",
        "SharpnessIncreasing",
    }


def test_enhance_ops_blend_as_specified():
    gray = np.full((8, 8, 3), 100, np.uint8)
    assert np.abs(_op(gray, "BrightnessIncreasing", 5) - 145).max() <= 1  # factor 1.45
    assert np.abs(_op(gray, "BrightnessIncreasing", 5, negate=True) - 55).max() <= 1
    assert np.abs(_op(gray, "Brightness", 5) - 100).max() <= 1  # factor 1.0
    halves = gray.copy()
    halves[:, :4], halves[:, 4:] = 60, 140  # Mean 100; factor 1.45 -> 100 -/+ 58.
    out = _op(halves, "ContrastIncreasing", 5)
    assert np.abs(out[:, :4] - 42).max() <= 1 and np.abs(out[:, 4:] - 158).max() <= 1
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 200
    out = _op(colour, "Color", 0)  # factor 0.1: nearly gray.
    assert out[..., 0].max() - out[..., 1].min() < 0.15 * 200


# A bright pixel at (row 20, col 30) of a 41 x 41 image (centre 20.5, 20.5 in pixel-centre
# coordinates); expected landing centre from the op's geometry.
_R, _C = 20.5, 30.5
_GEOMETRY = [
    ("Rotate", 10, False, (20.5 - 10 * math.sin(math.pi / 6), 20.5 + 10 * math.cos(math.pi / 6))),
    ("Rotate", 10, True, (20.5 + 10 * math.sin(math.pi / 6), 20.5 + 10 * math.cos(math.pi / 6))),
    ("ShearX", 10, False, (_R, _C - 0.3 * _R)),
    ("ShearY", 10, True, (_R + 0.3 * _C, _C)),
    ("TranslateXRel", 10, False, (_R, _C - 0.45 * 41)),
    ("TranslateYRel", 10, True, (_R + 0.45 * 41, _C)),
]


@pytest.mark.parametrize("name,level,negate,centre", _GEOMETRY)
def test_geometric_op_moves_pixel(name, level, negate, centre):
    x = np.full((41, 41, 3), 10, np.uint8)
    x[20, 30] = 255
    out = _op(x, name, level, negate)
    is_fill = np.all(out == FILL, axis=-1)
    row, col = np.unravel_index(np.argmax(np.where(is_fill, 0, out[..., 0])), is_fill.shape)
    assert math.hypot(row + 0.5 - centre[0], col + 0.5 - centre[1]) <= 1.0
    assert out[row, col, 0] > 100


@pytest.mark.parametrize(
    "name,negate,filled,kept",
    [
        ("Rotate", False, [(0, 0), (40, 40), (0, 40), (40, 0)], [(20, 20)]),
        ("ShearX", False, [(40, 40)], [(0, 0), (0, 40), (40, 0)]),
        ("TranslateXRel", False, [(0, 40), (40, 25)], [(0, 0), (40, 10)]),
        ("TranslateYRel", True, [(0, 0), (10, 40)], [(40, 0), (30, 40)]),
    ],
)
def test_geometric_op_fills_uncovered_pixels(name, negate, filled, kept):
    out = _op(np.full((41, 41, 3), 10, np.uint8), name, 10, negate)
    for r, c in filled:
        np.testing.assert_array_equal(out[r, c], FILL)
    for r, c in kept:
        np.testing.assert_array_equal(out[r, c], 10)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("rand-m9-mstd0.5-inc1", ra.RandAugmentPolicy(9, 2, 0.5, True)),
        ("rand-m9-n3", ra.RandAugmentPolicy(9, 3, 0.0, False)),
        ("rand-n1-m7-inc0", ra.RandAugmentPolicy(7, 1, 0.0, False)),
        ("rand", ra.RandAugmentPolicy(10, 2, 0.0, False)),
    ],
)
def test_parse_rand_augment(spec, expected):
    assert ra.parse_rand_augment(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "augmix-m5", "rand-m", "rand-x3", "rand-w0", "rand-m9.5", "rand--m9", "rand-mstdx"]
)
def test_parse_rand_augment_rejects(spec):
    with pytest.raises(ValueError, match=repr(spec).replace("(", r"\(")):
        ra.parse_rand_augment(spec)


def test_policy_op_lists():
    assert len(ra.RAND_OPS) == len(ra.RAND_INCREASING_OPS) == 15
    increasing = ra.parse_rand_augment("rand-inc1").op_names
    assert "PosterizeIncreasing" in increasing and "Posterize" not in increasing
    assert "SolarizeAdd" in increasing and "TranslateXRel" in increasing


def _sample(spec, trials, seed=0):
    rng = np.random.default_rng(seed)
    policy = ra.parse_rand_augment(spec)
    return [ra.sample_steps(policy, rng) for _ in range(trials)]


def test_sample_steps_statistics():
    trials = 3000
    draws = _sample("rand-m9-mstd0.5-inc1", trials)
    steps = [s for d in draws for s in d]
    assert abs(len(steps) / (2 * trials) - 0.5) < 0.03  # Each layer applied with p 0.5.
    counts = {name: 0 for name in ra.RAND_INCREASING_OPS}
    for s in steps:
        counts[s.name] += 1
    expected = len(steps) / 15
    assert all(abs(n - expected) < 0.3 * expected for n in counts.values())
    signed = [s.negate for s in steps if ra.OPS[s.name].signed]
    assert abs(np.mean(signed) - 0.5) < 0.05
    assert not any(s.negate for s in steps if not ra.OPS[s.name].signed)
    # With replacement: both layers sometimes pick the same op.
    assert any(len(d) == 2 and d[0].name == d[1].name for d in draws)
    magnitudes = np.array([s.magnitude for s in steps])
    assert abs(magnitudes.mean() - 9.0) < 0.05 and abs(magnitudes.std() - 0.5) < 0.05


def test_magnitude_noise_is_clipped():
    magnitudes = np.array([s.magnitude for d in _sample("rand-m9-mstd5", 3000) for s in d])
    assert magnitudes.min() == 0.0 and magnitudes.max() == 10.0
    # P(N(9, 5) > 10) = 0.421, P(N(9, 5) < 0) = 0.036.
    assert abs(np.mean(magnitudes == 10.0) - 0.421) < 0.04
    assert abs(np.mean(magnitudes == 0.0) - 0.036) < 0.015
    fixed = {s.magnitude for d in _sample("rand-m7", 200) for s in d}
    assert fixed == {7.0}


def test_apply_rand_augment_is_seeded():
    image = Image.fromarray(_noise(shape=(32, 32, 3)))
    policy = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")

    def run(seed):
        rng = np.random.default_rng(seed)
        out = ra.apply_rand_augment(image, policy, fill=FILL, interpolation=BICUBIC, rng=rng)
        return np.asarray(out)

    np.testing.assert_array_equal(run(3), run(3))
    outputs = [run(seed) for seed in range(6)]
    assert len({o.tobytes() for o in outputs}) >= 4


def test_color_jitter_brightness_range_on_gray():
    # A uniform gray image is unchanged by contrast and saturation: only brightness acts.
    gray = Image.fromarray(np.full((4, 4, 3), 100, np.uint8))
    ratios = [
        np.asarray(augment.color_jitter(gray, 0.4, np.random.default_rng(s)))[0, 0, 0] / 100
        for s in range(300)
    ]
    assert min(ratios) >= 0.6 - 0.01 and max(ratios) <= 1.4 + 0.01
    assert min(ratios) < 0.65 and max(ratios) > 1.35 and abs(np.mean(ratios) - 1.0) < 0.05


def test_color_jitter_changes_colours_and_is_seeded():
    image = Image.fromarray(_noise(shape=(16, 16, 3)))
    first = np.asarray(augment.color_jitter(image, 0.4, np.random.default_rng(1)))
    again = np.asarray(augment.color_jitter(image, 0.4, np.random.default_rng(1)))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, np.asarray(image))
    same = augment.color_jitter(image, 0.0, np.random.default_rng(1))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(image))


_FINETUNE = dict(
    size=32,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    interpolation="bicubic",
    hflip=True,
    mean=IMAGENET_MEAN,
)


def _finetune(seed, **overrides):
    image = Image.fromarray(_noise(shape=(48, 60, 3)))
    kwargs = {**_FINETUNE, "color_jitter": 0.4, "auto_augment": "rand-m9-mstd0.5-inc1"}
    kwargs.update(overrides)
    return augment.finetune_augment(image, rng=np.random.default_rng(seed), **kwargs)


def test_fill_color_of_imagenet_mean():
    assert augment.fill_color(IMAGENET_MEAN) == FILL


def test_finetune_augment_shape_and_seed():
    out = _finetune(5)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, _finetune(5))
    assert len({_finetune(s).tobytes() for s in range(6)}) == 6


def test_finetune_augment_skips_color_jitter_with_rand_augment():
    for seed in range(5):
        np.testing.assert_array_equal(_finetune(seed), _finetune(seed, color_jitter=0.0))
        jittered = _finetune(seed, auto_augment="")
        plain = _finetune(seed, auto_augment="", color_jitter=0.0)
        assert not np.array_equal(jittered, plain)


def test_finetune_augment_is_crop_then_rand_augment():
    image = Image.fromarray(_noise(shape=(48, 60, 3)))
    rng = np.random.default_rng(9)
    cropped = augment.pretrain_augment(
        image, rng=rng, **{k: _FINETUNE[k] for k in _FINETUNE if k != "mean"}
    )
    policy = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")
    expected = ra.apply_rand_augment(
        Image.fromarray(cropped), policy, fill=FILL, interpolation=BICUBIC, rng=rng
    )
    np.testing.assert_array_equal(_finetune(9), np.asarray(expected))


def test_random_erase_one_rectangle():
    height, width = 40, 50
    pixels = np.full((height, width, 3), 5.0, np.float32)
    for seed in range(40):
        out = augment.random_erase(pixels, prob=1.0, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(pixels, 5.0)  # Input untouched.
        changed = np.any(out != 5.0, axis=-1)
        rows, cols = np.nonzero(changed)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert changed.sum() == h * w  # One filled rectangle.
        assert h < height and w < width
        # h, w are rounded from the target area and aspect: some target in range must round to them.
        area = height * width
        assert (h - 0.5) * (w - 0.5) <= area / 3 and (h + 0.5) * (w + 0.5) >= 0.02 * area
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
        noise = out[changed]
        assert abs(noise.mean()) < 0.5 and 0.5 < noise.std() < 1.5


def test_random_erase_probability():
    pixels = np.zeros((16, 16, 3), np.float32)
    for seed in range(20):
        out = augment.random_erase(pixels, prob=0.0, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(out, pixels)
        assert out is not pixels
    erased = [
        np.any(augment.random_erase(pixels, prob=0.25, rng=np.random.default_rng(s)) != 0)
        for s in range(800)
    ]
    assert abs(np.mean(erased) - 0.25) < 0.05


def test_eval_resize_size():
    assert augment.eval_resize_size(224, 224 / 256) == 256
    assert augment.eval_resize_size(224, 0.875) == 256
    assert augment.eval_resize_size(192, 0.875) == 219  # 219.43 truncated.
    assert augment.eval_resize_size(200, 0.875) == 228  # 228.57 truncated.


@pytest.mark.parametrize("width,left", [(301, 38), (303, 40)])
def test_eval_transform_crops_centre_without_resize(width, left):
    # Shorter side already 256: the resize keeps the image and the crop is a plain slice at
    # top = 16, left = round((width - 224) / 2) with Python's half-to-even (38.5 -> 38, 39.5 -> 40).
    x = _noise(shape=(256, width, 3))
    out = augment.eval_transform(
        Image.fromarray(x), size=224, crop_pct=0.875, interpolation="bicubic"
    )
    np.testing.assert_array_equal(out, x[16:240, left : left + 224])


@pytest.mark.parametrize("shape", [(120, 200, 3), (300, 150, 3)])
def test_eval_transform_centre_lands_in_centre(shape):
    x = np.zeros(shape, np.uint8)
    r, c = shape[0] // 2, shape[1] // 2
    x[r - 6 : r + 6, c - 6 : c + 6] = 255
    out = augment.eval_transform(
        Image.fromarray(x), size=64, crop_pct=0.875, interpolation="bilinear"
    )
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    bright = np.argwhere(out[..., 0] > 128)
    np.testing.assert_allclose(bright.mean(axis=0), (31.5, 31.5), atol=1.0)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 0
