"""RandAugment as BridgeTower trains with it: the values at magnitude 7 and each operation's pixels."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from vlretrieval.errors import ConfigError
from vlretrieval.models.randaugment import (
    OPERATIONS,
    RandAugment,
    apply_operation,
    operation_value,
    randaugment_from,
)
from vlretrieval.models.registry import get_family
from vlretrieval.training.hparams import resolve_hparams

WIDTH, HEIGHT = 40, 30


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), "RGB")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def test_values_at_magnitude_7_are_the_references():
    # BridgeTower's randaug.py at RandAugment(2, 7): m / 30 * (max - min) + min over its 14 ranges.
    expected = {
        "AutoContrast": 7 / 30, "Equalize": 7 / 30, "Rotate": 7.0, "Posterize": 28 / 30,
        "Solarize": 256 * 7 / 30, "SolarizeAdd": 110 * 7 / 30, "Color": 0.52, "Contrast": 0.52,
        "Brightness": 0.52, "Sharpness": 0.52, "ShearX": 0.07, "ShearY": 0.07,
        "TranslateX": 100 * 7 / 30, "TranslateY": 100 * 7 / 30,
    }
    assert [name for name, _, _ in OPERATIONS] == list(expected)
    for name, value in expected.items():
        assert operation_value(name, 7) == pytest.approx(value, rel=1e-12), name
    # Posterize's range is 0..4 while PIL counts kept bits: up to magnitude 7 one bit is kept.
    src = _pixels(_image(9))
    np.testing.assert_array_equal(_pixels(apply_operation(_image(9), "Posterize", operation_value("Posterize", 7))),
                                  src & 0x80)


@pytest.mark.parametrize("value", [0.07, -0.3])
def test_shear_x_moves_each_row_by_value_times_its_height(value):
    image = _image(1)
    out, src = _pixels(apply_operation(image, "ShearX", value)), _pixels(image)
    expected = np.zeros_like(src)
    for y in range(HEIGHT):
        for x in range(WIDTH):
            # PIL maps the output pixel's centre through (1, v, 0, 0, 1, 0), nearest.
            sx = int(np.floor(x + 0.5 + value * (y + 0.5)))
            if 0 <= sx < WIDTH:
                expected[y, x] = src[y, sx]
    np.testing.assert_array_equal(out, expected)


def test_shear_y_moves_each_column():
    image = _image(2)
    out, src = _pixels(apply_operation(image, "ShearY", 0.21)), _pixels(image)
    for x in (0, 13, 39):
        for y in range(HEIGHT):
            sy = int(np.floor(y + 0.5 + 0.21 * (x + 0.5)))
            assert (out[y, x] == (src[sy, x] if 0 <= sy < HEIGHT else 0)).all()


@pytest.mark.parametrize("name,value", [("TranslateX", 23.3), ("TranslateX", -7.6), ("TranslateY", 5.0)])
def test_translate_samples_value_pixels_away_and_fills_black(name, value):
    image = _image(3)
    out, src = _pixels(apply_operation(image, name, value)), _pixels(image)
    expected = np.zeros_like(src)
    for y in range(HEIGHT):
        for x in range(WIDTH):
            sx, sy = (int(np.floor(x + 0.5 + value)), y) if name == "TranslateX" else (x, int(np.floor(y + 0.5 + value)))
            if 0 <= sx < WIDTH and 0 <= sy < HEIGHT:
                expected[y, x] = src[sy, sx]
    np.testing.assert_array_equal(out, expected)


def test_rotate_turns_counter_clockwise_about_the_centre():
    square = Image.fromarray(np.random.default_rng(4).integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB")
    np.testing.assert_array_equal(_pixels(apply_operation(square, "Rotate", 90.0)), np.rot90(_pixels(square)))
    tilted = _pixels(apply_operation(square, "Rotate", 7.0))
    assert (tilted[0, 0] == 0).all() and not np.array_equal(tilted, _pixels(square))


def test_colour_operations():
    image = _image(5)
    src = _pixels(image)
    darker = _pixels(apply_operation(image, "Brightness", 0.52))
    assert np.abs(darker - src * 0.52).max() <= 1.0
    threshold = operation_value("Solarize", 7)
    np.testing.assert_array_equal(_pixels(apply_operation(image, "Solarize", threshold)),
                                  np.where(src < threshold, src, 255 - src))
    added = np.clip(src + 25.0, 0, 255).astype(np.uint8).astype(np.int64)
    np.testing.assert_array_equal(_pixels(apply_operation(image, "SolarizeAdd", 25.0)),
                                  np.where(added < 128, added, 255 - added))
    grey = Image.fromarray(np.full((HEIGHT, WIDTH, 3), [200, 100, 50], np.uint8), "RGB")
    faded = _pixels(apply_operation(grey, "Color", 0.1))
    assert np.ptp(faded[0, 0]) < np.ptp(_pixels(grey)[0, 0]) / 5  # channels pulled to their grey
    low = Image.fromarray((src // 4 + 60).astype(np.uint8), "RGB")
    stretched = _pixels(apply_operation(low, "AutoContrast", 0.0)).reshape(-1, 3)
    assert stretched.min(0).tolist() == [0, 0, 0] and stretched.max(0).tolist() == [255] * 3
    assert _pixels(apply_operation(low, "Equalize", 0.0)).max() == 255


def test_randaugment_draws_from_its_generator_and_is_validated():
    image = _image(6)
    augment = RandAugment(num_ops=2, magnitude=7)
    first = _pixels(augment(image, random.Random(11)))
    np.testing.assert_array_equal(first, _pixels(augment(image, random.Random(11))))
    outputs = {_pixels(augment(image, random.Random(seed))).tobytes() for seed in range(30)}
    assert len(outputs) > 15
    for bad in ({"num_ops": 0}, {"magnitude": 31}, {"magnitude": -1}, {"num_ops": True}, {"magnitude": "7"}):
        with pytest.raises(ConfigError, match="randaugment"):
            RandAugment(**bad)
    with pytest.raises(ConfigError, match="unknown key"):
        randaugment_from({"ops": 2})
    assert randaugment_from(None) is None and randaugment_from({"num_ops": 2, "magnitude": 7}) == augment


def test_training_transform_takes_the_augmentation_hyperparameters():
    family = get_family("bridgetower")
    plain = family.training_transform(64, resolve_hparams({"hflip": False}))
    assert plain.crop_scale == (0.9, 1.0) and plain.randaugment is None and plain.train and not plain.hflip
    blip = family.training_transform(64, resolve_hparams({"crop_scale": [0.5, 1.0], "randaugment": {"num_ops": 2, "magnitude": 7}}))
    assert blip.crop_scale == (0.5, 1.0) and blip.randaugment == RandAugment(2, 7) and blip.image_size == 64
    # The same crop with and without RandAugment, from the same generator state.
    cropped = family.training_transform(64, resolve_hparams({"crop_scale": [0.5, 1.0]}))
    image = _image(7).resize((80, 80))
    without, with_ops = cropped(image, random.Random(0)), blip(image, random.Random(0))
    assert without.shape == with_ops.shape == (3, 64, 64) and not np.allclose(without, with_ops)
    np.testing.assert_array_equal(with_ops, blip(image, random.Random(0)))
    for bad in ([0.0, 1.0], [0.6, 0.5], [0.5], "0.5", [True, 1.0]):
        with pytest.raises(ConfigError, match="crop_scale"):
            resolve_hparams({"crop_scale": bad})
    with pytest.raises(ConfigError, match="randaugment"):
        resolve_hparams({"randaugment": [2, 7]})
