"""Image augmentation on the host: PIL in, numpy out.

Pretraining (SPEC 1.2): RandomResizedCrop with torchvision's sampling rule, horizontal flip,
scale to [0, 1], normalize. Randomness comes from a `np.random.Generator` the caller seeds per
example, so the output is a pure function of the image and that generator.

Fine-tuning (SimMIM / iTPN): timm 0.4.12 `create_transform(is_training=True, color_jitter=0.4,
auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel', re_count=1,
interpolation='bicubic')` is `finetune_augment`, then `normalize`, then `random_erase`; the eval
transform (resize the shorter side to `int(size / crop_pct)`, centre crop) is `eval_transform`.
As in timm, color jitter runs only when no auto-augment is configured, so the recipe above applies
RandAugment and no color jitter. The draws follow timm's / torchvision's distributions but come
from the numpy generator, so they are not bit-identical to theirs (which use Python's `random`
and torch's generator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance

from mim_jax.data import rand_augment

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_CROP_ATTEMPTS = 10
_ERASE_ATTEMPTS = 10
_ERASE_AREA = (0.02, 1 / 3)
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
_JITTER_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def sample_crop_box(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Samples a RandomResizedCrop box `(top, left, crop_height, crop_width)`.

    torchvision's rule: up to 10 attempts, each drawing an area fraction uniformly in `scale`
    and an aspect ratio (width / height) log-uniformly in `ratio`, then the top and left
    offsets uniformly; the first box that fits the image wins. If none fits, the largest
    centred box whose aspect ratio is clamped into `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pretrain_augment(
    image: Image.Image,
    *,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    interpolation: str,
    hflip: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """RandomResizedCrop to `size` and an optional random horizontal flip (p = 0.5).

    Args:
      image: an RGB PIL image.
      size: output height and width.
      scale, ratio: RandomResizedCrop area-fraction and aspect-ratio ranges.
      interpolation: 'bilinear' or 'bicubic'.
      hflip: whether to flip with probability 0.5 (the draw is made only when True).
      rng: per-example generator; consumed as crop draws, then one flip draw.

    Returns:
      uint8 `[size, size, 3]`.
    """
    top, left, h, w = sample_crop_box(image.height, image.width, scale, ratio, rng)
    crop = image.resize(
        (size, size), INTERPOLATIONS[interpolation], box=(left, top, left + w, top + h)
    )
    pixels = np.asarray(crop, dtype=np.uint8)
    if hflip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return pixels


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 `[..., 3]` -> float32 `(x / 255 - mean) / std`, per channel."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def color_jitter(image: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """torchvision ColorJitter(strength, strength, strength) without hue, on an RGB image.

    Brightness, contrast and saturation factors are each uniform in
    [max(0, 1 - strength), 1 + strength] and applied in a uniformly random order with PIL
    ImageEnhance (Brightness, Contrast, Color), as torchvision does for PIL images. Consumes
    `rng` as a permutation of 3, then the three factors (brightness, contrast, saturation).
    """
    order = rng.permutation(len(_JITTER_ENHANCERS))
    factors = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=len(_JITTER_ENHANCERS))
    for index in order:
        image = _JITTER_ENHANCERS[index](image).enhance(float(factors[index]))
    return image


_color_jitter = color_jitter  # finetune_augment's keyword `color_jitter` shadows the function.


def fill_color(mean: Sequence[float]) -> tuple[int, ...]:
    """timm's RandAugment fill: the mean in 0..255, rounded (ImageNet -> (124, 116, 104))."""
    return tuple(min(255, round(255 * m)) for m in mean)


def finetune_augment(
    image: Image.Image,
    *,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    interpolation: str,
    hflip: bool,
    color_jitter: float,
    auto_augment: str,
    mean: Sequence[float],
    rng: np.random.Generator,
) -> np.ndarray:
    """timm's fine-tuning train transform up to (not including) ToTensor / Normalize.

    RandomResizedCrop + flip exactly as `pretrain_augment`, then RandAugment if `auto_augment`
    (e.g. 'rand-m9-mstd0.5-inc1'; fill `fill_color(mean)`, geometric ops resampled with
    `interpolation`), else color jitter if `color_jitter > 0`: timm skips color jitter whenever
    an auto-augment policy is set. Consumes `rng` as `pretrain_augment`, then RandAugment's or
    the jitter's draws.

    Returns:
      uint8 `[size, size, 3]`.
    """
    pixels = pretrain_augment(
        image,
        size=size,
        scale=scale,
        ratio=ratio,
        interpolation=interpolation,
        hflip=hflip,
        rng=rng,
    )
    if auto_augment:
        policy = rand_augment.parse_rand_augment(auto_augment)
        out = rand_augment.apply_rand_augment(
            Image.fromarray(pixels),
            policy,
            fill=fill_color(mean),
            interpolation=INTERPOLATIONS[interpolation],
            rng=rng,
        )
    elif color_jitter > 0:
        out = _color_jitter(Image.fromarray(pixels), color_jitter, rng)
    else:
        return pixels
    return np.asarray(out, dtype=np.uint8)


def random_erase(pixels: np.ndarray, *, prob: float, rng: np.random.Generator) -> np.ndarray:
    """timm RandomErasing(prob, mode='pixel', max_count=1) on one normalized image.

    With probability `prob`: up to 10 attempts, each drawing an area fraction uniformly in
    [0.02, 1/3] and an aspect ratio (height / width) log-uniformly in [0.3, 1/0.3]; the first
    box with h < H and w < W is placed uniformly and filled with per-pixel standard normal
    noise. Consumes `rng` as one probability draw, then per attempt two draws, then the offsets
    and the noise.

    Args:
      pixels: float32 `[H, W, C]` (not modified).
      prob: erasing probability.
      rng: per-example generator.

    Returns:
      A new float32 `[H, W, C]` array.
    """
    out = np.array(pixels, dtype=np.float32)
    if rng.random() >= prob:
        return out
    height, width, channels = out.shape
    for _ in range(_ERASE_ATTEMPTS):
        target_area = rng.uniform(*_ERASE_AREA) * height * width
        aspect = math.exp(rng.uniform(*_ERASE_LOG_ASPECT))
        h = round(math.sqrt(target_area * aspect))
        w = round(math.sqrt(target_area / aspect))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            out[top : top + h, left : left + w] = rng.standard_normal(
                (h, w, channels), dtype=np.float32
            )
            break
    return out


def eval_resize_size(size: int, crop_pct: float) -> int:
    """Shorter-side length before the centre crop: `int(size / crop_pct)` (224 / 0.875 -> 256)."""
    return int(size / crop_pct)


def eval_transform(
    image: Image.Image, *, size: int, crop_pct: float, interpolation: str
) -> np.ndarray:
    """timm / SimMIM eval transform up to ToTensor: Resize(int(size / crop_pct)), CenterCrop(size).

    torchvision semantics: the shorter side becomes `short = eval_resize_size(size, crop_pct)`,
    the longer side `int(short * longer / shorter)`; the crop's top-left offsets are
    `round((side - size) / 2)` (Python's round, as torchvision). `crop_pct` must be in (0, 1] so
    the crop fits (torchvision would pad otherwise).

    Returns:
      uint8 `[size, size, 3]`.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    short = eval_resize_size(size, crop_pct)
    width, height = image.size
    if width <= height:
        new_width, new_height = short, int(short * height / width)
    else:
        new_width, new_height = int(short * width / height), short
    resized = image.resize((new_width, new_height), INTERPOLATIONS[interpolation])
    top = round((new_height - size) / 2.0)
    left = round((new_width - size) / 2.0)
    crop = resized.crop((left, top, left + size, top + size))
    return np.asarray(crop, dtype=np.uint8)
