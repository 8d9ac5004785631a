"""The `norm_pix_loss` switch of GreenMIM and iTPN (SPEC 0, 2.7, 3.3): the config field (default
on, settable from the config arg and from flags), each method's jitted loss against numpy MAE
formulas computed from the model's own predictions (norm-pix and plain pixels), and the
reconstruction grid, which un-normalizes only norm-pix predictions."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from helpers import ROOT, load_config, tiny_greenmim_config
from ml_collections import config_flags

from mim_jax.methods import greenmim, itpn

EPS = 1e-6  # MAE's norm-pix epsilon.
TOL = dict(rtol=2e-5, atol=1e-6)


def _patches(images: np.ndarray, unit: int) -> np.ndarray:
    """Brute-force MAE patchify: `[B, H, W, C]` -> `[B, L, unit*unit*C]`, (row, col, channel)."""
    b, h, w, _ = images.shape
    rows = [
        [
            images[n, i : i + unit, j : j + unit].reshape(-1)
            for i in range(0, h, unit)
            for j in range(0, w, unit)
        ]
        for n in range(b)
    ]
    return np.asarray(rows, np.float64)


def _unpatchify(patches: np.ndarray, unit: int, size: int) -> np.ndarray:
    """Brute-force inverse of `_patches` for `size x size` RGB images."""
    out = np.zeros((patches.shape[0], size, size, 3))
    grid = size // unit
    for n in range(patches.shape[0]):
        for k in range(patches.shape[1]):
            i, j = divmod(k, grid)
            out[n, i * unit : (i + 1) * unit, j * unit : (j + 1) * unit] = patches[n, k].reshape(
                unit, unit, 3
            )
    return out


def _reference_loss(images, pred, removed, unit: int, norm_pix: bool) -> float:
    """MAE forward_loss in numpy (float64): optional per-patch normalization with unbiased
    variance, mean over the patch vector, mean over removed patches."""
    target = _patches(np.asarray(images), unit)
    if norm_pix:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, ddof=1, keepdims=True)
        target = (target - mean) / (var + EPS) ** 0.5
    per_patch = ((np.asarray(pred, np.float64) - target) ** 2).mean(-1)
    removed = np.asarray(removed, np.float64)
    return float((per_patch * removed).sum() / removed.sum())


def _images(batch: int, size: int) -> np.ndarray:
    """Noise around a per-image colour offset, so per-patch normalization changes the target."""
    rng = np.random.default_rng(0)
    offsets = rng.uniform(-2.0, 2.0, size=(batch, 1, 1, 3))
    return (0.3 * rng.normal(size=(batch, size, size, 3)) + offsets).astype(np.float32)


@nnx.jit
def _jitted_loss(model, batch):
    """The method's loss_fn under jit (the switch must be static there)."""
    method = greenmim if isinstance(model, greenmim.GreenMIMModel) else itpn
    loss, _ = method.loss_fn(model, batch, None)
    return loss


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["greenmim", "itpn"])
def test_config_field_default_and_overrides(method, monkeypatch):
    assert load_config(method).norm_pix_loss is True
    assert load_config(method, "quickstart").norm_pix_loss is True
    assert load_config(method, "quickstart,norm_pix_loss=false").norm_pix_loss is False
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    argv = [
        "prog",
        f"--config={ROOT}/configs/{method}.py:quickstart",
        "--config.norm_pix_loss=false",
    ]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv.
    values(argv)
    assert values.config.norm_pix_loss is False


# --- GreenMIM -------------------------------------------------------------------------------


def _greenmim(norm_pix_loss: bool):
    config = tiny_greenmim_config(batch_size=4, norm_pix_loss=norm_pix_loss)
    model = greenmim.build_model(config, nnx.Rngs(params=0))
    images = _images(4, config.model.img_size)
    host = greenmim.make_batch_transform(config)({"image": images, "index": np.arange(4)}, 0)
    return model, jax.tree.map(jnp.asarray, {k: v for k, v in host.items() if k != "index"})


@pytest.fixture(scope="module")
def greenmim_runs() -> dict:
    runs = {}
    for norm in (True, False):
        model, batch = _greenmim(norm)
        pred = model(batch["image"], batch["plans"], batch["unit_mask"])
        runs[norm] = dict(
            model=model,
            batch=batch,
            pred=np.asarray(pred),
            loss=float(_jitted_loss(model, batch)),
            grid=greenmim.reconstruct(model, batch),
        )
    return runs


@pytest.mark.parametrize("norm", [True, False])
def test_greenmim_loss_matches_numpy(greenmim_runs, norm):
    run = greenmim_runs[norm]
    assert run["model"].norm_pix_loss is norm
    unit, batch = run["model"].unit, run["batch"]
    expected = _reference_loss(batch["image"], run["pred"], batch["unit_mask"], unit, norm)
    np.testing.assert_allclose(run["loss"], expected, **TOL)


def test_greenmim_switch_is_live(greenmim_runs):
    np.testing.assert_array_equal(greenmim_runs[True]["pred"], greenmim_runs[False]["pred"])
    assert abs(greenmim_runs[True]["loss"] - greenmim_runs[False]["loss"]) > 0.1


def test_greenmim_reconstruction_grid(greenmim_runs):
    _check_grid(greenmim_runs, "unit_mask", lambda model: model.unit)


# --- iTPN -----------------------------------------------------------------------------------


def _itpn(norm_pix_loss: bool):
    """HiViT on 32 px crops (2x2 main patches of 16 px, 2 kept), pixel loss only."""
    c = load_config("itpn", f"quickstart,norm_pix_loss={str(norm_pix_loss).lower()}")
    c.model.update(img_size=32, embed_dim=16, mlp_depth=1, depth=1, num_heads=2, fpn_dim=16)
    c.decoder.update(embed_dim=16, depth=1, num_heads=2)
    c.mfm.teacher = "none"
    c.mask.ratio = 0.5
    model = itpn.build_model(c, nnx.Rngs(params=0))
    images = _images(4, c.model.img_size)
    host = itpn.make_batch_transform(c)({"image": images, "index": np.arange(4)}, 0)
    return model, {k: jnp.asarray(v) for k, v in host.items() if k != "index"}


@pytest.fixture(scope="module")
def itpn_runs() -> dict:
    runs = {}
    for norm in (True, False):
        model, batch = _itpn(norm)
        out, _ = model(batch["image"], batch["ids_keep"])
        runs[norm] = dict(
            model=model,
            batch=batch,
            pred=np.asarray(out.pred),
            loss=float(_jitted_loss(model, batch)),
            grid=itpn.reconstruct(model, batch),
        )
    return runs


@pytest.mark.parametrize("norm", [True, False])
def test_itpn_loss_matches_numpy(itpn_runs, norm):
    run = itpn_runs[norm]
    assert run["model"].objective.norm_pix_loss is norm
    unit, batch = run["model"].patch_size, run["batch"]
    expected = _reference_loss(batch["image"], run["pred"], batch["mask"], unit, norm)
    np.testing.assert_allclose(run["loss"], expected, **TOL)


def test_itpn_switch_is_live(itpn_runs):
    np.testing.assert_array_equal(itpn_runs[True]["pred"], itpn_runs[False]["pred"])
    assert abs(itpn_runs[True]["loss"] - itpn_runs[False]["loss"]) > 0.1


def test_itpn_reconstruction_grid(itpn_runs):
    _check_grid(itpn_runs, "mask", lambda model: model.patch_size)


# --- shared ---------------------------------------------------------------------------------


def _check_grid(runs: dict, mask_key: str, unit_of) -> None:
    """Plain predictions are drawn as is; norm-pix ones times each input patch's std plus its
    mean; `pasted` is the prediction at removed units and the input elsewhere."""
    for norm, run in runs.items():
        images, unit = np.asarray(run["batch"]["image"]), unit_of(run["model"])
        pred = run["pred"].astype(np.float64)
        if norm:
            patches = _patches(images, unit)
            std = (patches.var(-1, ddof=1, keepdims=True) + EPS) ** 0.5
            pred = pred * std + patches.mean(-1, keepdims=True)
        expected = _unpatchify(pred, unit, images.shape[1])
        np.testing.assert_allclose(np.asarray(run["grid"]["prediction"]), expected, **TOL)
        removed = _unpatchify(
            np.repeat(np.asarray(run["batch"][mask_key], np.float64)[..., None], unit**2 * 3, -1),
            unit,
            images.shape[1],
        )
        pasted = np.where(removed > 0, expected, images)
        np.testing.assert_allclose(np.asarray(run["grid"]["pasted"]), pasted, **TOL)
