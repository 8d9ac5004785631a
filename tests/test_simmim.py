"""SimMIM method (SPEC 1.4, 1.5): pixel-shuffle decoder, pixel mask, masked L1, batch masks.

References are written here from the SPEC (explicit loops / hand-computed numbers); the model
checks run a real tiny Swin SimMIM model built from `configs/simmim.py` (quickstart, shrunk).
"""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mim_jax import masking
from mim_jax.methods import simmim
from mim_jax.models import heads

CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "simmim.py"
IMG, PATCH, MASK_PATCH, RATIO = 32, 4, 8, 0.6
GRID = IMG // PATCH  # 8 model patches per side
UNITS = (IMG // MASK_PATCH) ** 2  # 16 mask patches
MASKED_UNITS = math.ceil(UNITS * RATIO)  # 10


def tiny_config():
    spec = importlib.util.spec_from_file_location("simmim_config", CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("quickstart")
    config.model.img_size = IMG
    config.model.patch_size = PATCH
    config.model.embed_dim = 16
    config.model.depths = (2, 2)
    config.model.num_heads = (1, 2)
    config.model.window_size = 2
    config.mask.patch_size = MASK_PATCH
    config.mask.ratio = RATIO
    config.batch_size = 2
    config.seed = 3
    return config


def random_model(config, seed: int = 1, scale: float = 0.2) -> simmim.SimMIMModel:
    """`build_model(config, nnx.Rngs(0))` traced abstractly, then random normal parameters.

    Skips the eager truncated-normal initializers (about 20 s of XLA compiles on a 2-core CPU);
    the tests here do not depend on the initial values.
    """
    abstract = nnx.eval_shape(lambda: simmim.build_model(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), state)
    return nnx.merge(graphdef, state)


@nnx.jit
def probe(model, batch, offset):
    """loss_fn and reconstruct with `offset` added to the decoder output, and the gradient of
    loss_fn with respect to that offset (= with respect to the decoder output). One compile
    serves every offset."""
    original = heads.PixelShuffleHead.__call__

    def add_to_decoder(o):
        heads.PixelShuffleHead.__call__ = lambda self, feats: original(self, feats) + o

    def loss(o):
        add_to_decoder(o)
        return simmim.loss_fn(model, batch, None)

    try:
        (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(offset)
        add_to_decoder(offset)
        images = simmim.reconstruct(model, batch)
    finally:
        heads.PixelShuffleHead.__call__ = original
    return value, aux, grad, images


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    model = random_model(config)
    assert model.encoder.stride == 8 and model.encoder.num_features == 32
    assert model.encoder.patch_size == PATCH
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, IMG, IMG, 3)).astype(np.float32),
        "index": np.array([4, 11], np.int64),
    }
    batch = simmim.make_batch_transform(config)(batch, 7)
    batch = {key: jnp.asarray(value) for key, value in batch.items()}
    zero = jnp.zeros((2, IMG, IMG, 3), jnp.float32)
    loss, aux, grad, images = probe(model, batch, zero)
    return model, batch, loss, aux, grad, {k: np.asarray(v) for k, v in images.items()}


def np_pixel_mask(mask, patch):
    """`[B, h, w]` -> `[B, h*p, w*p, 1]`, pixel by pixel."""
    b, h, w = mask.shape
    out = np.zeros((b, h * patch, w * patch, 1), np.float32)
    for y in range(h * patch):
        for x in range(w * patch):
            out[:, y, x, 0] = mask[:, y // patch, x // patch]
    return out


def np_masked_l1(images, reconstruction, pixels):
    err = np.abs(images.astype(np.float64) - reconstruction.astype(np.float64))
    return (err * pixels).sum() / (pixels.sum() + 1e-5) / images.shape[-1]


# --- decoder ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("stride", "channels"), [(2, 3), (3, 2), (1, 4)])
def test_pixel_shuffle_matches_definition(stride, channels):
    b, h, w = 2, 2, 3
    x = np.random.default_rng(1).normal(size=(b, h, w, channels * stride * stride))
    out = np.asarray(heads.pixel_shuffle(jnp.asarray(x, jnp.float32), stride, channels))
    assert out.shape == (b, h * stride, w * stride, channels)
    expected = np.zeros((b, h * stride, w * stride, channels), np.float32)
    for bi in range(b):
        for hi in range(h):
            for wi in range(w):
                for c in range(channels):
                    for i in range(stride):
                        for j in range(stride):
                            value = x[bi, hi, wi, c * stride * stride + i * stride + j]
                            expected[bi, hi * stride + i, wi * stride + j, c] = value
    np.testing.assert_array_equal(out, expected)


def test_pixel_shuffle_head_is_linear_then_shuffle():
    in_features, stride = 8, 2
    head = heads.PixelShuffleHead(in_features, stride, rngs=nnx.Rngs(0))
    kernel = np.asarray(head.proj.kernel[...], np.float64)
    assert kernel.shape == (in_features, stride * stride * 3)
    assert np.abs(kernel).max() <= in_features**-0.5  # PyTorch default U(-1/sqrt(fan_in), ...)
    feats = np.random.default_rng(2).normal(size=(2, 2, 3, in_features))
    out = np.asarray(head(jnp.asarray(feats, jnp.float32)))
    proj = feats @ kernel + np.asarray(head.proj.bias[...])
    expected = np.zeros((2, 4, 6, 3))
    for y in range(4):
        for x in range(6):
            for c in range(3):
                expected[:, y, x, c] = proj[:, y // 2, x // 2, c * 4 + (y % 2) * 2 + (x % 2)]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --- pixel mask and loss ----------------------------------------------------------------------


def test_pixel_mask_repeats_each_patch():
    mask = np.random.default_rng(3).integers(0, 2, size=(2, 3, 4)).astype(np.int32)
    pixels = np.asarray(simmim.pixel_mask(jnp.asarray(mask), 4))
    assert pixels.shape == (2, 12, 16, 1)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, np_pixel_mask(mask, 4))


def test_masked_l1_hand_computed():
    # Two 4x4 images with 2 channels, patch 2: image 0 masks its top-left patch, image 1 its
    # bottom-right one. Targets are 0; visible pixels get a huge error that must not count.
    images = np.zeros((2, 4, 4, 2), np.float32)
    rec = np.full((2, 4, 4, 2), 100.0, np.float32)
    rec[0, :2, :2] = (1.0, -3.0)  # |err| 1 + 3 on each of 4 pixels -> 16
    rec[1, 2:, 2:] = (0.5, -0.5)  # |err| 0.5 + 0.5 on each of 4 pixels -> 4
    mask = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], np.int32)
    pixels = simmim.pixel_mask(jnp.asarray(mask), 2)
    loss = float(simmim.masked_l1(jnp.asarray(images), jnp.asarray(rec), pixels))
    # sum = 20 over 8 masked pixels (+1e-5), averaged over the 2 channels.
    assert loss == pytest.approx(20.0 / (8.0 + 1e-5) / 2.0, rel=2e-7, abs=0)
    assert abs(loss - 1.25) > 1e-6  # the +1e-5 in the denominator is there

    # One masked pixel, one channel: 1 / (1 + 1e-5).
    loss = float(
        simmim.masked_l1(
            jnp.zeros((1, 2, 2, 1)),
            jnp.full((1, 2, 2, 1), 1.0),
            jnp.asarray([[[[1.0], [0.0]], [[0.0], [0.0]]]]),
        )
    )
    assert loss == pytest.approx(1.0 / (1.0 + 1e-5), rel=1e-7, abs=0)


def test_masked_l1_ignores_visible_pixels(setup):
    _, batch, _, _, _, images_out = setup
    images = np.asarray(batch["image"])
    reconstruction = images_out["prediction"]
    pixels = np_pixel_mask(np.asarray(batch["mask"]), PATCH)
    base = float(simmim.masked_l1(images, reconstruction, pixels))
    np.testing.assert_allclose(base, np_masked_l1(images, reconstruction, pixels), rtol=1e-6)

    visible = pixels[..., 0] == 0
    changed = reconstruction.copy()
    changed[visible] += np.random.default_rng(4).normal(size=changed[visible].shape) * 10
    assert float(simmim.masked_l1(images, changed, pixels)) == base

    b, y, x = np.argwhere(~visible)[0]
    changed = reconstruction.copy()
    changed[b, y, x, 1] = images[b, y, x, 1] + 50.0
    assert float(simmim.masked_l1(images, changed, pixels)) > base + 1e-3

    grad = np.asarray(jax.grad(simmim.masked_l1, argnums=1)(images, reconstruction, pixels))
    assert grad.shape == reconstruction.shape
    assert np.all(grad[visible] == 0)
    # d|x - r| / dr = -sign(x - r), scaled by 1 / (masked pixels + 1e-5) / channels.
    expected = -np.sign(images - reconstruction) / (pixels.sum() + 1e-5) / 3
    np.testing.assert_allclose(grad[~visible], expected[~visible], rtol=1e-5)


def test_loss_fn_outputs_and_gradient(setup):
    _, batch, loss, aux, grad, images_out = setup
    reconstruction = images_out["prediction"]
    assert reconstruction.shape == (2, IMG, IMG, 3)
    assert loss.shape == () and set(aux) >= {"l1_masked", "mask_fraction"}
    assert all(np.asarray(v).shape == () for v in aux.values())
    assert float(aux["l1_masked"]) == float(loss)
    images = np.asarray(batch["image"])
    pixels = np_pixel_mask(np.asarray(batch["mask"]), PATCH)
    np.testing.assert_allclose(float(loss), np_masked_l1(images, reconstruction, pixels), rtol=1e-5)
    # Every image masks 10 of its 16 mask patches, hence 10/16 of its pixels.
    assert float(aux["mask_fraction"]) == pytest.approx(pixels.mean(), abs=1e-7)
    assert float(aux["mask_fraction"]) == pytest.approx(MASKED_UNITS / UNITS, abs=1e-7)

    # Gradient of loss_fn with respect to the decoder output: 0 at visible pixels.
    grad = np.asarray(grad)
    visible = pixels[..., 0] == 0
    assert np.all(grad[visible] == 0)
    expected = -np.sign(images - reconstruction) / (pixels.sum() + 1e-5) / 3
    np.testing.assert_allclose(grad[~visible], expected[~visible], rtol=1e-5)


def test_loss_fn_depends_only_on_masked_pixels(setup):
    """Offsets added to the decoder output inside loss_fn: visible ones change nothing."""
    model, batch, loss, _, _, _ = setup
    visible = np_pixel_mask(np.asarray(batch["mask"]), PATCH)[..., 0] == 0
    offset = np.zeros((2, IMG, IMG, 3), np.float32)
    offset[visible] = np.random.default_rng(5).normal(size=offset[visible].shape) * 10
    shifted, _, _, _ = probe(model, batch, jnp.asarray(offset))
    assert float(shifted) == pytest.approx(float(loss), rel=1e-6)
    offset = np.zeros((2, IMG, IMG, 3), np.float32)
    offset[~visible] = 7.0
    shifted, _, _, _ = probe(model, batch, jnp.asarray(offset))
    assert float(shifted) > float(loss) + 1.0


# --- batch transform and reconstruction -------------------------------------------------------


def test_make_batch_transform_adds_deterministic_masks():
    config = tiny_config()
    transform = simmim.make_batch_transform(config)
    image = np.zeros((2, IMG, IMG, 3), np.float32)
    batch = {"image": image, "index": np.array([5, 9])}
    out = transform(batch, 3)
    assert "mask" not in batch  # the input batch is left alone
    assert out["image"] is image
    mask = out["mask"]
    assert mask.shape == (2, GRID, GRID) and mask.dtype == np.int32
    expected = masking.simmim_masks(
        config.seed,
        3,
        np.array([5, 9]),
        input_size=IMG,
        mask_patch_size=MASK_PATCH,
        model_patch_size=PATCH,
        mask_ratio=RATIO,
    )
    np.testing.assert_array_equal(mask, expected)
    # 8 px mask patches are 2x2 blocks of model patches; 10 of 16 blocks are masked.
    scale = MASK_PATCH // PATCH
    for m in mask:
        blocks = m.reshape(GRID // scale, scale, GRID // scale, scale)
        assert np.all(blocks == blocks[:, :1, :, :1])
        assert blocks[:, 0, :, 0].sum() == MASKED_UNITS
    # A pure function of (step, index): same again, per example, different at another step.
    np.testing.assert_array_equal(transform(batch, 3)["mask"], mask)
    swapped = transform({"image": image, "index": np.array([9, 5])}, 3)["mask"]
    np.testing.assert_array_equal(swapped, mask[::-1])
    assert not np.array_equal(transform(batch, 4)["mask"], mask)


def test_reconstruct_pastes_prediction_into_masked_pixels(setup):
    model, batch, _, _, _, out = setup
    assert set(out) >= {"input", "masked", "prediction", "pasted"}
    images = np.asarray(batch["image"])
    masked = np_pixel_mask(np.asarray(batch["mask"]), PATCH)[..., 0] == 1
    for value in out.values():
        assert value.shape == images.shape and value.dtype == np.float32
    np.testing.assert_array_equal(out["input"], images)
    # `prediction` is the decoder output: an offset added there shows up unchanged (and
    # test_loss_fn_outputs_and_gradient ties it to the reconstruction loss_fn scores).
    offset = np.random.default_rng(6).normal(size=images.shape).astype(np.float32)
    moved = probe(model, batch, jnp.asarray(offset))[3]
    np.testing.assert_allclose(
        np.asarray(moved["prediction"]) - out["prediction"], offset, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(moved["input"]), images)
    np.testing.assert_array_equal(out["masked"][masked], 0.0)
    np.testing.assert_array_equal(out["masked"][~masked], images[~masked])
    np.testing.assert_array_equal(out["pasted"][~masked], images[~masked])
    np.testing.assert_array_equal(out["pasted"][masked], out["prediction"][masked])
