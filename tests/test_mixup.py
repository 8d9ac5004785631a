"""Mixup / CutMix (timm 'batch' mode) and the soft-target cross-entropy against numpy references."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from mim_jax.methods import mixup

BATCH, HEIGHT, WIDTH, CHANNELS, CLASSES = 4, 8, 12, 3, 5
BOTH = mixup.MixupSettings(
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    prob=1.0,
    switch_prob=0.5,
    label_smoothing=0.1,
    num_classes=CLASSES,
)
CUTMIX = dataclasses.replace(BOTH, mixup_alpha=0.0, label_smoothing=0.0)
MIXUP = dataclasses.replace(BOTH, cutmix_alpha=0.0)

mix_jit = jax.jit(mixup.mix_batch, static_argnames="settings")


def _batch(seed: int = 0, batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Distinct continuous pixels (no accidental ties) and labels with repeats."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, HEIGHT, WIDTH, CHANNELS)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=batch).astype(np.int32)
    return images, labels


def _one_hot(labels: np.ndarray, smoothing: float) -> np.ndarray:
    """numpy reference: off = s / K, on = 1 - s + s / K."""
    out = np.full((labels.size, CLASSES), smoothing / CLASSES)
    out[np.arange(labels.size), labels] += 1.0 - smoothing
    return out


def _keys(count: int) -> jax.Array:
    return jax.random.split(jax.random.key(1234), count)


def _is_pasted(images: np.ndarray, mixed: np.ndarray) -> np.ndarray:
    """Per key, whether every pixel is the row's own or its partner's (a cutmix output)."""
    own = mixed == images[None]
    partner = mixed == images[None, ::-1]
    return np.all(own | partner, axis=(1, 2, 3, 4))


def test_smooth_one_hot_hand_values():
    got = np.asarray(mixup.smooth_one_hot(jnp.array([2, 0]), CLASSES, 0.1))
    want = np.array([[0.02, 0.02, 0.92, 0.02, 0.02], [0.92, 0.02, 0.02, 0.02, 0.02]])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cutmix_box_matches_timm_formula():
    """Every centre and a spread of lams against rand_bbox's numpy float64 arithmetic."""
    lams = np.random.default_rng(3).beta(1.0, 1.0, size=40).astype(np.float32)
    lams = np.concatenate([lams, np.float32([0.0, 1.0, 0.75])])
    cy, cx, lam = np.meshgrid(np.arange(HEIGHT), np.arange(WIDTH), lams, indexing="ij")
    cy, cx, lam = cy.ravel(), cx.ravel(), lam.ravel()
    box = jax.vmap(mixup.cutmix_box, in_axes=(0, 0, 0, None, None))
    got = np.stack(box(jnp.asarray(lam), jnp.asarray(cy), jnp.asarray(cx), HEIGHT, WIDTH))
    ratio = np.sqrt(1.0 - lam.astype(np.float64))
    cut_h, cut_w = (HEIGHT * ratio).astype(int), (WIDTH * ratio).astype(int)
    want = np.stack(
        [
            np.clip(cy - cut_h // 2, 0, HEIGHT),
            np.clip(cy + cut_h // 2, 0, HEIGHT),
            np.clip(cx - cut_w // 2, 0, WIDTH),
            np.clip(cx + cut_w // 2, 0, WIDTH),
        ]
    )
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("settings", [BOTH, CUTMIX, MIXUP, dataclasses.replace(BOTH, prob=0.0)])
def test_target_rows_sum_to_one(settings):
    images, labels = _batch()
    for key in _keys(4):
        _, targets, _ = mix_jit(key, images, labels, settings=settings)
        assert targets.shape == (BATCH, CLASSES) and targets.dtype == jnp.float32
        np.testing.assert_allclose(np.sum(targets, axis=-1), 1.0, rtol=1e-6)


def test_cutmix_pastes_one_rectangle_from_partner():
    images, labels = _batch()
    sizes = []
    for key in _keys(24):
        mixed, targets, lam = (np.asarray(a) for a in mix_jit(key, images, labels, settings=CUTMIX))
        own, partner = mixed == images, mixed == images[::-1]
        assert np.all(own | partner)
        from_partner = partner & ~own
        # The box is shared by rows and channels: one [H, W] mask.
        mask = from_partner[0, :, :, 0]
        assert np.all(from_partner == mask[None, :, :, None])
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if mask.any():
            assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))
            assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))
        assert np.array_equal(mask, np.outer(mask.any(1), mask.any(0)))
        area = int(mask.sum())
        sizes.append(area)
        # One float32 ulp: XLA turns the division by H*W into a multiply by its reciprocal.
        ulp = np.spacing(np.float32(1.0))
        np.testing.assert_allclose(lam, 1.0 - area / (HEIGHT * WIDTH), rtol=0, atol=ulp)
        want = lam * _one_hot(labels, 0.0) + (1.0 - lam) * _one_hot(labels[::-1], 0.0)
        np.testing.assert_allclose(targets, want, rtol=1e-6, atol=1e-7)
    assert len(set(sizes)) > 3 and max(sizes) > 0


def test_mixup_blends_with_partner():
    images, labels = _batch()
    for key in _keys(6):
        mixed, targets, lam = (np.asarray(a) for a in mix_jit(key, images, labels, settings=MIXUP))
        assert 0.0 < lam < 1.0
        np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-6)
        want = lam * _one_hot(labels, 0.1) + (1 - lam) * _one_hot(labels[::-1], 0.1)
        np.testing.assert_allclose(targets, want, rtol=1e-6, atol=1e-7)


def test_prob_zero_leaves_batch_unchanged():
    images, labels = _batch()
    mixed, targets, lam = mix_jit(
        _keys(1)[0], images, labels, settings=dataclasses.replace(BOTH, prob=0.0)
    )
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_allclose(targets, _one_hot(labels, 0.1), rtol=1e-6)
    assert float(lam) == 1.0


def _many(settings: mixup.MixupSettings, count: int, images, labels):
    run = jax.jit(jax.vmap(lambda k: mixup.mix_batch(k, images, labels, settings)))
    mixed, _, lam = run(_keys(count))
    return np.asarray(mixed), np.asarray(lam)


def test_switch_and_prob_frequencies():
    """Cutmix share ~ switch_prob and unmixed share ~ 1 - prob, over 2000 seeded keys."""
    images, labels = _batch(batch=2)
    count = 2000
    tol = 4 * math.sqrt(0.25 / count)
    mixed, _ = _many(dataclasses.replace(BOTH, switch_prob=0.3), count, images, labels)
    assert abs(_is_pasted(images, mixed).mean() - 0.3) < tol
    _, lam = _many(dataclasses.replace(MIXUP, prob=0.4), count, images, labels)
    assert abs((lam == 1.0).mean() - 0.6) < tol


def test_mixup_lam_follows_beta():
    images, labels = _batch(batch=2)
    _, lam = _many(MIXUP, 2000, images, labels)
    assert abs(lam.mean() - 0.5) < 0.03
    assert abs(lam.var() - 1 / (4 * (2 * 0.8 + 1))) < 0.015
    assert stats.kstest(lam, stats.beta(0.8, 0.8).cdf).pvalue > 1e-3


def test_soft_target_cross_entropy_reference():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6, CLASSES)).astype(np.float32) * 3
    targets = rng.dirichlet(np.ones(CLASSES), size=6).astype(np.float32)
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want = np.mean(np.sum(-targets * log_probs, axis=-1))
    got = mixup.soft_target_cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(mixup.soft_target_cross_entropy(logits, targets), want, rtol=1e-5)
    labels = rng.integers(0, CLASSES, size=6)
    hard = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    one_hot = mixup.soft_target_cross_entropy(logits, _one_hot(labels, 0.0))
    np.testing.assert_allclose(one_hot, hard, rtol=1e-6)


def test_sharded_batch_matches_unsharded_one_compile():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    images, labels = _batch(seed=5, batch=16)
    sharding = NamedSharding(mesh, P("data"))
    sharded = jax.device_put(images, sharding), jax.device_put(labels, sharding)
    # A function of its own: jit caches are shared by wrappers of one function.
    run = jax.jit(lambda key, x, y: mixup.mix_batch(key, x, y, BOTH))
    kinds = set()
    for key in _keys(6):
        got = run(key, *sharded)
        want = mix_jit(key, images, labels, settings=BOTH)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)
        assert got[0].sharding.is_equivalent_to(sharding, 4)
        kinds.add(bool(_is_pasted(images, np.asarray(got[0])[None])[0]))
    assert kinds == {True, False}
    assert run._cache_size() == 1
