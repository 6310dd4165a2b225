"""RandAugment as BridgeTower's training transform applies it (``blip_randaug_wc``).

BridgeTower's ``src/transforms/transform.py`` takes ``RandAugment`` from its ``randaug.py``, ViLT's
adaptation of rpmcruz/autoaugment, not torchvision's. Its semantics, which this module follows:

* each of ``num_ops`` steps draws one of 14 operations uniformly, with replacement;
* every operation gets the value ``magnitude / 30 * (high - low) + low`` of its range
  (:data:`OPERATIONS`), so at ``RandAugment(2, 7)`` the enhancers use the factor 0.52, Solarize the
  threshold 59.7, and Posterize keeps ``max(1, int(0.93))`` = 1 bit;
* shears, translations and rotations turn to the opposite direction with probability 0.5; they
  are PIL affine transforms (shear ``(1, v, 0, 0, 1, 0)``, translation by ``v`` pixels) and PIL's
  ``rotate``, with nearest-neighbour sampling and black fill.

``tests/test_randaugment.py`` checks the values at magnitude 7 and each operation's pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

#: (name, low, high) in the reference's order.
OPERATIONS: tuple[tuple[str, float, float], ...] = (
    ("AutoContrast", 0, 1),
    ("Equalize", 0, 1),
    ("Rotate", 0, 30),
    ("Posterize", 0, 4),
    ("Solarize", 0, 256),
    ("SolarizeAdd", 0, 110),
    ("Color", 0.1, 1.9),
    ("Contrast", 0.1, 1.9),
    ("Brightness", 0.1, 1.9),
    ("Sharpness", 0.1, 1.9),
    ("ShearX", 0.0, 0.3),
    ("ShearY", 0.0, 0.3),
    ("TranslateX", 0.0, 100),
    ("TranslateY", 0.0, 100),
)

#: Operations whose direction is drawn at random.
SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})

MAX_MAGNITUDE = 30


def operation_value(name: str, magnitude: float) -> float:
    """The value operation ``name`` gets at ``magnitude`` (0 to 30), before any random sign."""
    for op, low, high in OPERATIONS:
        if op == name:
            return float(magnitude) / MAX_MAGNITUDE * float(high - low) + low
    raise ValueError(f"unknown RandAugment operation {name!r}")


def apply_operation(image, name: str, value: float):
    """``image`` (PIL, RGB) after operation ``name`` with ``value`` (already signed)."""
    from PIL import Image, ImageEnhance, ImageOps

    def affine(coefficients):
        return image.transform(image.size, Image.AFFINE, coefficients, Image.NEAREST)

    if name == "ShearX":
        return affine((1, value, 0, 0, 1, 0))
    if name == "ShearY":
        return affine((1, 0, 0, value, 1, 0))
    if name == "TranslateX":
        return affine((1, 0, value, 0, 1, 0))
    if name == "TranslateY":
        return affine((1, 0, 0, 0, 1, value))
    if name == "Rotate":
        return image.rotate(value)
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Solarize":
        return ImageOps.solarize(image, value)
    if name == "SolarizeAdd":
        # The reference's defaults: the value is added, the threshold stays 128.
        brightened = np.clip(np.asarray(image, dtype=np.int64) + value, 0, 255).astype(np.uint8)
        return ImageOps.solarize(Image.fromarray(brightened, image.mode), 128)
    if name == "Posterize":
        return ImageOps.posterize(image, max(1, int(value)))
    enhancers = {
        "Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
        "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness,
    }
    if name in enhancers:
        return enhancers[name](image).enhance(value)
    raise ValueError(f"unknown RandAugment operation {name!r}")


@dataclass(frozen=True)
class RandAugment:
    """``num_ops`` random operations at ``magnitude`` (0 to 30); picklable for DataLoader workers."""

    num_ops: int = 2
    magnitude: float = 9

    def __post_init__(self):
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or self.num_ops < 1:
            raise ConfigError(f"randaugment num_ops must be a positive integer, got {self.num_ops!r}")
        if isinstance(self.magnitude, bool) or not isinstance(self.magnitude, (int, float)) or not (
            0 <= self.magnitude <= MAX_MAGNITUDE
        ):
            raise ConfigError(f"randaugment magnitude must be a number from 0 to {MAX_MAGNITUDE}, got {self.magnitude!r}")

    def __call__(self, image, rng: random.Random | None = None):
        rng = rng if rng is not None else random
        for name, _, _ in rng.choices(OPERATIONS, k=self.num_ops):
            value = operation_value(name, self.magnitude)
            if name in SIGNED and rng.random() > 0.5:
                value = -value
            image = apply_operation(image, name, value)
        return image


def randaugment_from(settings) -> RandAugment | None:
    """A :class:`RandAugment` from a ``randaugment`` hyperparameter (``null`` or a mapping)."""
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ConfigError(f"hyperparameter randaugment must be null or a mapping, got {settings!r}")
    unknown = sorted(set(settings) - {"num_ops", "magnitude"})
    if unknown:
        raise ConfigError(f"hyperparameter randaugment: unknown key(s) {unknown}; known: num_ops, magnitude")
    return RandAugment(**settings)
