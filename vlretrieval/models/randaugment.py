"""RandAugment on PIL images, with the operations and magnitudes of torchvision's ``RandAugment``.

BridgeTower's retrieval fine-tuning augments with BLIP's ``blip_randaug_wc`` transform: a random
resized crop, a horizontal flip, then torchvision's ``RandAugment(2, 7)``. This is that last step
without torch: each of ``num_ops`` steps picks one of 14 operations uniformly and applies it at the
strength of bin ``magnitude`` out of ``bins`` (31), negated with probability 0.5 for the operations
that have a direction. Geometric operations resample with nearest neighbours and fill with black,
torchvision's defaults. ``tests/test_randaugment.py`` checks the magnitude table against
torchvision's values at bin 7 and each operation's pixels against its definition.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError

#: The operations in torchvision's order; ``True`` marks those drawn with a random sign.
OPERATIONS: tuple[tuple[str, bool], ...] = (
    ("Identity", False),
    ("ShearX", True),
    ("ShearY", True),
    ("TranslateX", True),
    ("TranslateY", True),
    ("Rotate", True),
    ("Brightness", True),
    ("Color", True),
    ("Contrast", True),
    ("Sharpness", True),
    ("Posterize", False),
    ("Solarize", False),
    ("AutoContrast", False),
    ("Equalize", False),
)


def _linspace(start: float, stop: float, bins: int, index: int) -> float:
    # float32, as torch.linspace computes the magnitude table
    import numpy as np

    return float(np.linspace(start, stop, bins, dtype=np.float32)[index])


def operation_strength(name: str, magnitude: int, bins: int, width: int, height: int) -> float:
    """The unsigned strength of operation ``name`` at bin ``magnitude`` for a ``width`` x ``height`` image."""
    if name in ("ShearX", "ShearY"):
        return _linspace(0.0, 0.3, bins, magnitude)
    if name == "TranslateX":
        return _linspace(0.0, 150.0 / 331.0 * width, bins, magnitude)
    if name == "TranslateY":
        return _linspace(0.0, 150.0 / 331.0 * height, bins, magnitude)
    if name == "Rotate":
        return _linspace(0.0, 30.0, bins, magnitude)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return _linspace(0.0, 0.9, bins, magnitude)
    if name == "Posterize":
        return float(8 - int(round(magnitude / ((bins - 1) / 4))))
    if name == "Solarize":
        return _linspace(255.0, 0.0, bins, magnitude)
    return 0.0


def _inverse_affine(center: tuple[float, float], angle: float, translate: tuple[float, float],
                    shear: tuple[float, float]) -> list[float]:
    """Coefficients PIL's AFFINE transform takes (output -> input), scale 1: the inverse of
    translate(center + translate) . rotate(angle) . shear . translate(-center)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    # The inverse of [[a, b], [c, d]] has determinant 1 here (rotation times shear).
    m = [d, -b, 0.0, -c, a, 0.0]
    cx, cy = center
    tx, ty = translate
    m[2] = m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] = m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def apply_operation(image, name: str, strength: float):
    """``image`` (PIL, RGB) after operation ``name`` at signed ``strength``."""
    from PIL import Image, ImageEnhance, ImageOps

    black = (0,) * len(image.getbands())

    def affine(center, translate=(0.0, 0.0), shear=(0.0, 0.0)):
        matrix = _inverse_affine(center, 0.0, translate, shear)
        return image.transform(image.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=black)

    if name == "Identity":
        return image
    if name == "ShearX":
        return affine((0.0, 0.0), shear=(math.degrees(math.atan(strength)), 0.0))
    if name == "ShearY":
        return affine((0.0, 0.0), shear=(0.0, math.degrees(math.atan(strength))))
    if name == "TranslateX":
        return affine((image.width * 0.5, image.height * 0.5), translate=(float(int(strength)), 0.0))
    if name == "TranslateY":
        return affine((image.width * 0.5, image.height * 0.5), translate=(0.0, float(int(strength))))
    if name == "Rotate":
        return image.rotate(strength, Image.NEAREST, expand=False, fillcolor=black)
    enhancers: dict[str, Callable] = {
        "Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color,
        "Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness,
    }
    if name in enhancers:
        return enhancers[name](image).enhance(1.0 + strength)
    if name == "Posterize":
        return ImageOps.posterize(image, int(strength))
    if name == "Solarize":
        return ImageOps.solarize(image, strength)
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    raise ValueError(f"unknown RandAugment operation {name!r}")


@dataclass(frozen=True)
class RandAugment:
    """``num_ops`` random operations at strength bin ``magnitude`` of ``bins``; picklable."""

    num_ops: int = 2
    magnitude: int = 9
    bins: int = 31

    def __post_init__(self):
        for key in ("num_ops", "magnitude", "bins"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"randaugment {key} must be an integer, got {value!r}")
        if self.num_ops < 1 or self.bins < 2 or not 0 <= self.magnitude < self.bins:
            raise ConfigError(
                f"randaugment needs num_ops >= 1 and 0 <= magnitude < bins, got {self.num_ops}, {self.magnitude}, {self.bins}"
            )

    def __call__(self, image, rng: random.Random | None = None):
        rng = rng if rng is not None else random
        for _ in range(self.num_ops):
            name, signed = OPERATIONS[rng.randrange(len(OPERATIONS))]
            strength = operation_strength(name, self.magnitude, self.bins, image.width, image.height)
            if signed and rng.random() < 0.5:
                strength = -strength
            image = apply_operation(image, name, strength)
        return image


def randaugment_from(settings) -> RandAugment | None:
    """A :class:`RandAugment` from a ``randaugment`` hyperparameter (``null`` or a mapping)."""
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ConfigError(f"hyperparameter randaugment must be null or a mapping, got {settings!r}")
    unknown = sorted(set(settings) - {"num_ops", "magnitude", "bins"})
    if unknown:
        raise ConfigError(f"hyperparameter randaugment: unknown key(s) {unknown}; known: num_ops, magnitude, bins")
    return RandAugment(**settings)
