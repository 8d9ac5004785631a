"""Image augmentation on the host: PIL in, numpy out.

Pretraining (SPEC 1.2): RandomResizedCrop with torchvision's sampling rule, horizontal flip,
scale to [0, 1], normalize. Randomness comes from a `np.random.Generator` the caller seeds per
example, so the output is a pure function of the image and that generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_CROP_ATTEMPTS = 10


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
