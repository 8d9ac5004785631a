"""Mixup / CutMix in timm's 'batch' mode and the soft-target cross-entropy, as jittable JAX.

Follows timm 0.4.12 `Mixup(mode='batch', correct_lam=True)`: one draw per batch decides whether
to mix (probability `prob`), then mixup or cutmix (cutmix with probability `switch_prob` when both
are enabled), and lam ~ Beta(alpha, alpha). Row i is mixed with row B-1-i. Every draw is made and
the results selected with `jnp.where`, so shapes are static and one compilation serves every key;
only the settings (static, hashable) choose code paths at trace time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixupSettings:
    """Mixup/CutMix hyper-parameters; defaults are SimMIM's fine-tuning values."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    num_classes: int = 1000

    @property
    def active(self) -> bool:
        """Whether `mix_batch` can mix at all (some alpha > 0 and prob > 0)."""
        return (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0) and self.prob > 0.0


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Integer labels `[B]` -> label-smoothed one-hot `[B, K]` float32.

    Off value smoothing / K, on value 1 - smoothing + smoothing / K (timm's `mixup_target`).
    """
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    hit = labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]
    return jnp.where(hit, jnp.float32(on), jnp.float32(off))


def cutmix_box(
    lam: jax.Array, centre_y: jax.Array, centre_x: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """timm's `rand_bbox` for a given centre: (y_low, y_high, x_low, x_high) int32 scalars.

    The box side is int(side * sqrt(1 - lam)); its edges are centre -/+ half the side (floored),
    clipped to the image, so the area can be smaller than (1 - lam) of the image.
    """
    ratio = jnp.sqrt(jnp.maximum(1.0 - lam.astype(jnp.float32), 0.0))
    half_h = jnp.floor(height * ratio).astype(jnp.int32) // 2
    half_w = jnp.floor(width * ratio).astype(jnp.int32) // 2
    y_low = jnp.clip(centre_y - half_h, 0, height)
    y_high = jnp.clip(centre_y + half_h, 0, height)
    x_low = jnp.clip(centre_x - half_w, 0, width)
    x_high = jnp.clip(centre_x + half_w, 0, width)
    return y_low, y_high, x_low, x_high


def _draw_lam(key: jax.Array, settings: MixupSettings) -> tuple[jax.Array, jax.Array]:
    """One batch's (lam before the cutmix correction, use_cutmix); lam = 1 means no mixing."""
    k_apply, k_switch, k_mixup, k_cutmix = jax.random.split(key, 4)
    use_mixup, use_cutmix = settings.mixup_alpha > 0.0, settings.cutmix_alpha > 0.0
    if use_mixup:
        lam_mixup = jax.random.beta(k_mixup, settings.mixup_alpha, settings.mixup_alpha)
    if use_cutmix:
        lam_cutmix = jax.random.beta(k_cutmix, settings.cutmix_alpha, settings.cutmix_alpha)
    if use_mixup and use_cutmix:
        cutmix = jax.random.uniform(k_switch) < settings.switch_prob
        lam = jnp.where(cutmix, lam_cutmix, lam_mixup)
    elif use_mixup:
        cutmix, lam = jnp.bool_(False), lam_mixup
    else:
        cutmix, lam = jnp.bool_(True), lam_cutmix
    apply = jax.random.uniform(k_apply) < settings.prob
    return jnp.where(apply, lam, 1.0).astype(jnp.float32), apply & cutmix


def mix_batch(
    key: jax.Array, images: jax.Array, labels: jax.Array, settings: MixupSettings
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mix a batch with its reverse: (images `[B, H, W, C]`, int labels `[B]`) -> mixed.

    Returns (mixed images, same shape and floating dtype; soft targets `[B, K]` float32 =
    lam * y + (1 - lam) * flip(y) with label smoothing; lam, a float32 scalar, for cutmix the
    share of the image left unpasted). Works unchanged on a batch sharded over devices.
    """
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"mix_batch needs floating images, got {images.dtype}")
    targets = smooth_one_hot(labels, settings.num_classes, settings.label_smoothing)
    if not settings.active:
        return images, targets, jnp.float32(1.0)
    k_lam, k_y, k_x = jax.random.split(key, 3)
    lam, cutmix = _draw_lam(k_lam, settings)
    _, height, width, _ = images.shape
    centre_y = jax.random.randint(k_y, (), 0, height)
    centre_x = jax.random.randint(k_x, (), 0, width)
    y_low, y_high, x_low, x_high = cutmix_box(lam, centre_y, centre_x, height, width)
    area = (y_high - y_low) * (x_high - x_low)
    lam_cut = 1.0 - area.astype(jnp.float32) / jnp.float32(height * width)
    lam = jnp.where(cutmix, lam_cut, lam)

    partner = jnp.flip(images, axis=0)
    rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    in_box = (rows >= y_low) & (rows < y_high) & (cols >= x_low) & (cols < x_high)
    pasted = jnp.where(in_box[None, :, :, None], partner, images)
    x32, partner32 = images.astype(jnp.float32), partner.astype(jnp.float32)
    blended = (x32 * lam + partner32 * (1.0 - lam)).astype(images.dtype)
    mixed = jnp.where(cutmix, pasted, blended)
    targets = targets * lam + jnp.flip(targets, axis=0) * (1.0 - lam)
    return mixed, targets, lam


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of sum_k -targets * log_softmax(logits), in float32.

    logits, targets `[B, K]` -> scalar (timm's `SoftTargetCrossEntropy`).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(-targets.astype(jnp.float32) * log_probs, axis=-1))
