"""RandAugment as timm 0.4.12 builds it for fine-tuning, on PIL images, numpy-RNG driven.

Reproduced from timm's `rand_augment_transform` / `RandAugment` / `AugmentOp`:
- config strings 'rand-m9-mstd0.5-inc1', 'rand-m9-n3', ... (sections in any order after 'rand';
  defaults m10, n2, mstd0, inc0);
- the 15 ops of `_RAND_TRANSFORMS`, or of `_RAND_INCREASING_TRANSFORMS` with 'inc1' (posterize,
  solarize and the four enhance ops grow more severe with the level), each with timm's
  level -> argument mapping (`OPS`);
- per layer: an op chosen uniformly with replacement (no choice weights), applied with
  probability 0.5; when applied, magnitude ~ N(m, mstd) if mstd > 0, clipped to [0, 10]; the
  argument of rotate, shear, translate and the increasing enhance ops is negated with
  probability 0.5;
- rotate / shear / translate fill uncovered pixels with `fill` (timm: the dataset mean in 0..255)
  and resample with `interpolation` (timm: the configured one, bicubic for SimMIM / iTPN);
- translate is relative, as timm's TranslateXRel / TranslateYRel: level / 10 * 0.45 of the width
  (height). timm's `translate_const` hparam feeds only AutoAugment's absolute translate ops, which
  RandAugment does not use, so it is not a parameter here.

Deliberate differences:
- every draw comes from the caller's `np.random.Generator` (timm mixes Python's `random` and the
  global numpy state), so results follow timm's distribution but are not bit-identical to it;
- parsing is stricter: a section timm would skip or assert on (no digits, unknown key, 'w' choice
  weights, which are not implemented) raises ValueError; 'inc0' means not increasing (timm
  evaluates `bool('0')`, which is True).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
_APPLY_PROB = 0.5
_TRANSLATE_FRACTION = 0.45
_SOLARIZE_ADD_THRESHOLD = 128

Fill = tuple[int, int, int]


def _affine(
    image: Image.Image, matrix: tuple[float, ...], fill: Fill, interpolation: Image.Resampling
) -> Image.Image:
    return image.transform(
        image.size, Image.Transform.AFFINE, matrix, resample=interpolation, fillcolor=fill
    )


def rotate(
    image: Image.Image, degrees: float, *, fill: Fill, interpolation: Image.Resampling
) -> Image.Image:
    """Rotates counter-clockwise by `degrees` about the image centre, same size."""
    return image.rotate(degrees, resample=interpolation, fillcolor=fill)


def shear_x(
    image: Image.Image, factor: float, *, fill: Fill, interpolation: Image.Resampling
) -> Image.Image:
    """output(x, y) = input(x + factor * y, y): positive factor moves lower rows left."""
    return _affine(image, (1, factor, 0, 0, 1, 0), fill, interpolation)


def shear_y(
    image: Image.Image, factor: float, *, fill: Fill, interpolation: Image.Resampling
) -> Image.Image:
    """output(x, y) = input(x, y + factor * x): positive factor moves right columns up."""
    return _affine(image, (1, 0, 0, factor, 1, 0), fill, interpolation)


def translate_x(
    image: Image.Image, fraction: float, *, fill: Fill, interpolation: Image.Resampling
) -> Image.Image:
    """Moves the content left by `fraction * width` pixels (right when negative)."""
    return _affine(image, (1, 0, fraction * image.width, 0, 1, 0), fill, interpolation)


def translate_y(
    image: Image.Image, fraction: float, *, fill: Fill, interpolation: Image.Resampling
) -> Image.Image:
    """Moves the content up by `fraction * height` pixels (down when negative)."""
    return _affine(image, (1, 0, 0, 0, 1, fraction * image.height), fill, interpolation)


def solarize_add(
    image: Image.Image, amount: int, threshold: int = _SOLARIZE_ADD_THRESHOLD
) -> Image.Image:
    """Adds `amount` (saturating at 255) to every channel value below `threshold`."""
    values = np.arange(256)
    lut = np.where(values < threshold, np.minimum(values + amount, 255), values)
    return image.point(lut.tolist() * len(image.getbands()))


def _enhance(enhancer: type[ImageEnhance._Enhance], image: Image.Image, factor: float):
    return enhancer(image).enhance(factor)


class Op(NamedTuple):
    """One RandAugment op: `fn(image[, arg][, fill=, interpolation=])`.

    `arg(level, sign)` maps a level in [0, 10] and a sign (+1 or -1) to fn's argument (None for
    ops without one); `signed` says whether the sign is drawn (otherwise it is +1).
    """

    fn: Callable[..., Image.Image]
    arg: Callable[[float, float], float] | None = None
    signed: bool = False
    geometric: bool = False


def _enhance_op(enhancer: type[ImageEnhance._Enhance], increasing: bool) -> Op:
    fn = functools.partial(_enhance, enhancer)
    if increasing:
        return Op(fn, lambda level, sign: 1.0 + sign * level / MAX_LEVEL * 0.9, signed=True)
    return Op(fn, lambda level, _: level / MAX_LEVEL * 1.8 + 0.1)


def _posterize_bits(level: float, _: float) -> int:
    return int(level / MAX_LEVEL * 4)


def _solarize_threshold(level: float, _: float) -> int:
    return int(level / MAX_LEVEL * 256)


def _signed_scale(scale: float) -> Callable[[float, float], float]:
    return lambda level, sign: sign * level / MAX_LEVEL * scale


OPS: dict[str, Op] = {
    "AutoContrast": Op(ImageOps.autocontrast),
    "Equalize": Op(ImageOps.equalize),
    "Invert": Op(ImageOps.invert),
    "Rotate": Op(rotate, _signed_scale(30.0), signed=True, geometric=True),
    "Posterize": Op(ImageOps.posterize, _posterize_bits),
    "PosterizeIncreasing": Op(ImageOps.posterize, lambda lv, s: 4 - _posterize_bits(lv, s)),
    "Solarize": Op(ImageOps.solarize, _solarize_threshold),
    "SolarizeIncreasing": Op(ImageOps.solarize, lambda lv, s: 256 - _solarize_threshold(lv, s)),
    "SolarizeAdd": Op(solarize_add, lambda level, _: int(level / MAX_LEVEL * 110)),
    "Color": _enhance_op(ImageEnhance.Color, increasing=False),
    "ColorIncreasing": _enhance_op(ImageEnhance.Color, increasing=True),
    "Contrast": _enhance_op(ImageEnhance.Contrast, increasing=False),
    "ContrastIncreasing": _enhance_op(ImageEnhance.Contrast, increasing=True),
    "Brightness": _enhance_op(ImageEnhance.Brightness, increasing=False),
    "BrightnessIncreasing": _enhance_op(ImageEnhance.Brightness, increasing=True),
    "Sharpness": _enhance_op(ImageEnhance.Sharpness, increasing=False),
    "SharpnessIncreasing": _enhance_op(ImageEnhance.Sharpness, increasing=True),
    "ShearX": Op(shear_x, _signed_scale(0.3), signed=True, geometric=True),
    "ShearY": Op(shear_y, _signed_scale(0.3), signed=True, geometric=True),
    "TranslateXRel": Op(
        translate_x, _signed_scale(_TRANSLATE_FRACTION), signed=True, geometric=True
    ),
    "TranslateYRel": Op(
        translate_y, _signed_scale(_TRANSLATE_FRACTION), signed=True, geometric=True
    ),
}

_SHARED_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate")
_SEVERITY_OPS = ("Posterize", "Solarize")
_ENHANCE_OPS = ("Color", "Contrast", "Brightness", "Sharpness")
_GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_OPS = (*_SHARED_OPS, *_SEVERITY_OPS, "SolarizeAdd", *_ENHANCE_OPS, *_GEOMETRIC_OPS)
RAND_INCREASING_OPS = (
    *_SHARED_OPS,
    *(f"{name}Increasing" for name in _SEVERITY_OPS),
    "SolarizeAdd",
    *(f"{name}Increasing" for name in _ENHANCE_OPS),
    *_GEOMETRIC_OPS,
)


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
    """A parsed 'rand-...' spec: `num_layers` ops per image at `magnitude` in [0, 10]."""

    magnitude: float = MAX_LEVEL
    num_layers: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False

    @property
    def op_names(self) -> tuple[str, ...]:
        """The 15 ops chosen from: timm's `_RAND_(INCREASING_)TRANSFORMS`."""
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


_SECTION = re.compile(r"([a-z]+)(\d.*)")
_PARSERS = {"m": ("magnitude", int), "n": ("num_layers", int), "mstd": ("magnitude_std", float)}


def parse_rand_augment(spec: str) -> RandAugmentPolicy:
    """'rand-m9-mstd0.5-inc1' -> RandAugmentPolicy(9, 2, 0.5, True); ValueError if malformed."""
    sections = spec.split("-")
    if sections[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand'")
    fields: dict[str, float | int | bool] = {}
    for section in sections[1:]:
        match = _SECTION.fullmatch(section)
        key = match.group(1) if match else None
        if key not in (*_PARSERS, "inc"):
            raise ValueError(f"RandAugment spec {spec!r}: unsupported section {section!r}")
        try:
            if key == "inc":
                fields["increasing"] = bool(int(match.group(2)))
            else:
                name, convert = _PARSERS[key]
                fields[name] = convert(match.group(2))
        except ValueError as error:
            raise ValueError(f"RandAugment spec {spec!r}: bad value in {section!r}") from error
    if fields.get("num_layers", 2) < 0:
        raise ValueError(f"RandAugment spec {spec!r}: negative number of layers")
    return RandAugmentPolicy(**fields)


@dataclasses.dataclass(frozen=True)
class Step:
    """One op that was drawn and will be applied: name, clipped magnitude, argument sign."""

    name: str
    magnitude: float
    negate: bool


def sample_steps(policy: RandAugmentPolicy, rng: np.random.Generator) -> list[Step]:
    """The policy's random draws for one image: the applied ops, in order.

    Consumes `rng` as: `num_layers` op indices (uniform, with replacement), then per layer one
    apply draw and, if applied, a magnitude draw (only when magnitude_std > 0) and a sign draw
    (only for signed ops).
    """
    names = policy.op_names
    steps = []
    for index in rng.integers(0, len(names), size=policy.num_layers):
        if rng.random() >= _APPLY_PROB:
            continue
        magnitude = policy.magnitude
        if policy.magnitude_std > 0:
            magnitude = rng.normal(magnitude, policy.magnitude_std)
        magnitude = min(MAX_LEVEL, max(0.0, float(magnitude)))
        negate = OPS[names[index]].signed and rng.random() < 0.5
        steps.append(Step(names[index], magnitude, bool(negate)))
    return steps


def apply_op(
    image: Image.Image,
    name: str,
    magnitude: float,
    *,
    negate: bool = False,
    fill: Fill,
    interpolation: Image.Resampling,
) -> Image.Image:
    """Applies op `name` at level `magnitude` (argument negated if `negate` and signed)."""
    op = OPS[name]
    if op.arg is None:
        return op.fn(image)
    arg = op.arg(magnitude, -1.0 if negate else 1.0)
    if op.geometric:
        return op.fn(image, arg, fill=fill, interpolation=interpolation)
    return op.fn(image, arg)


def apply_rand_augment(
    image: Image.Image,
    policy: RandAugmentPolicy,
    *,
    fill: Fill,
    interpolation: Image.Resampling,
    rng: np.random.Generator,
) -> Image.Image:
    """RandAugment on an RGB image: `sample_steps`, then each step's op in order.

    Args:
      image: RGB PIL image.
      policy: from `parse_rand_augment`.
      fill: RGB 0..255 for pixels uncovered by rotate / shear / translate.
      interpolation: PIL resampling filter of those geometric ops.
      rng: per-example generator, consumed as `sample_steps` documents.
    """
    for step in sample_steps(policy, rng):
        image = apply_op(
            image,
            step.name,
            step.magnitude,
            negate=step.negate,
            fill=fill,
            interpolation=interpolation,
        )
    return image
