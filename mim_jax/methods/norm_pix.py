"""MAE-style pixel targets shared by GreenMIM and iTPN (SPEC 2.7, 3.3): patchify, per-patch
normalized pixels (unbiased variance + 1e-6) or the plain patches (MAE's `norm_pix_loss` off),
MSE on removed patches, and the reconstruction grid that un-normalizes norm-pix predictions
with each target patch's mean and std (SPEC 0)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mim_jax.models import backward, layers

NORM_PIX_EPS = 1e-6


def patchify(images: jax.Array, unit: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, L, unit*unit*C]`, patches raster order, vector order (p, q, c)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // unit, unit, w // unit, unit, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // unit) * (w // unit), unit * unit * c)


def unpatchify(patches: jax.Array, unit: int, channels: int = 3) -> jax.Array:
    """Inverse of `patchify` for square images."""
    b, length, _ = patches.shape
    g = math.isqrt(length)
    x = patches.reshape(b, g, g, unit, unit, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * unit, g * unit, channels)


def patch_stats(images: jax.Array, unit: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Patches `[B, L, P]`, their mean and std `sqrt(unbiased var + 1e-6)` `[B, L, 1]`."""
    patches = patchify(images.astype(jnp.float32), unit)
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)
    return patches, mean, jnp.sqrt(var + NORM_PIX_EPS)


def norm_pix_targets(images: jax.Array, unit: int) -> jax.Array:
    """Per-patch normalized pixels `[B, L, unit*unit*C]` (SPEC 2.7)."""
    patches, mean, std = patch_stats(images, unit)
    return (patches - mean) / std


def pixel_targets(images: jax.Array, unit: int, *, norm_pix: bool) -> jax.Array:
    """float32 targets `[B, L, unit*unit*C]`: per-patch normalized pixels (`norm_pix`, MAE's
    `norm_pix_loss`) or the patchified input as is (already normalized with the dataset's
    mean and std)."""
    if norm_pix:
        return norm_pix_targets(images, unit)
    return patchify(images.astype(jnp.float32), unit)


@functools.partial(backward.custom_vjp, nondiff_argnums=(4,))
def linear_mse(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, target: jax.Array, dtype: jnp.dtype
) -> jax.Array:
    """float32 `mean((x @ kernel + bias - target)**2)`: a `layers.Linear` head (computed in
    `dtype`) and the MSE over everything, target `[..., P]`, x `[..., D]`.

    Autodiff keeps `pred - target` and XLA fuses the `2 / n` factor into each of its consumers
    (the head's bias, kernel and input gradients), materializing the `[..., P]` gradient once
    per consumer; here the unscaled difference is the one residual and the factor scales the
    small results (the target's gradient, unused for data, is dropped by XLA).
    """
    return jnp.mean(jnp.square(_linear(x, kernel, bias, dtype).astype(jnp.float32) - target))


def _linear(x, kernel, bias, dtype):
    return x.astype(dtype) @ kernel.astype(dtype) + bias.astype(dtype)


def _linear_mse_fwd(x, kernel, bias, target, dtype):
    diff = _linear(x, kernel, bias, dtype).astype(jnp.float32) - target
    return jnp.mean(jnp.square(diff)), (x, kernel, diff)


def _linear_mse_bwd(dtype, residuals, g):
    x, kernel, diff = residuals
    scale = g * (2.0 / diff.size)
    d = diff.reshape(-1, diff.shape[-1]).astype(dtype)
    xs = x.reshape(-1, x.shape[-1]).astype(dtype)
    dx = scale * jnp.matmul(d, kernel.astype(dtype).T, preferred_element_type=jnp.float32)
    dkernel = scale * layers.kernel_grad(xs, dx, d)
    dbias = scale * jnp.sum(d, axis=0, dtype=jnp.float32)
    dtarget = (-scale * diff).astype(diff.dtype)
    return dx.reshape(x.shape).astype(x.dtype), dkernel, dbias, dtarget


linear_mse.defvjp(_linear_mse_fwd, _linear_mse_bwd)


def masked_mse(pred: jax.Array, target: jax.Array, unit_mask: jax.Array) -> jax.Array:
    """Mean over the patch vector, then mean over removed units (`unit_mask` 1)."""
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    m = unit_mask.astype(jnp.float32)
    return jnp.sum(per_patch * m) / jnp.sum(m)


def reconstruction_grid(
    images: jax.Array, pred: jax.Array, unit_mask: jax.Array, unit: int, *, norm_pix: bool = True
) -> dict[str, jax.Array]:
    """Images `[B, H, W, C]`, predictions `[B, L, unit*unit*C]` and the removed-unit mask
    `[B, L]` -> input, masked input, prediction and prediction pasted into the removed units,
    all in the input's normalized space. `norm_pix`: the predictions are norm-pix targets and
    are un-normalized with each input patch's mean and std; otherwise they are used as is."""
    images = images.astype(jnp.float32)
    channels = images.shape[-1]
    pred = pred.astype(jnp.float32)
    if norm_pix:
        _, mean, std = patch_stats(images, unit)
        pred = pred * std + mean
    prediction = unpatchify(pred, unit, channels)
    removed = unit_mask.astype(jnp.float32)[..., None]
    pixels = unpatchify(jnp.repeat(removed, unit**2 * channels, axis=-1), unit, channels)
    return {
        "input": images,
        "masked": images * (1 - pixels),
        "prediction": prediction,
        "pasted": images * (1 - pixels) + prediction * pixels,
    }
