"""RandAugment: torchvision's magnitudes and each operation's effect on pixels."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from vlretrieval.errors import ConfigError
from vlretrieval.models.registry import get_family
from vlretrieval.models.randaugment import (
    OPERATIONS,
    RandAugment,
    apply_operation,
    operation_strength,
    randaugment_from,
)
from vlretrieval.training.finetune import resolve_hparams

WIDTH, HEIGHT = 40, 30


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), "RGB")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def test_strengths_at_bin_7_of_31_are_torchvisions():
    # torchvision's RandAugment._augmentation_space(31, (H, W)) at index 7 (BLIP's RandAugment(2, 7)).
    expected = {
        "Identity": 0.0, "ShearX": 0.07, "ShearY": 0.07, "TranslateX": 150 / 331 * WIDTH * 7 / 30,
        "TranslateY": 150 / 331 * HEIGHT * 7 / 30, "Rotate": 7.0, "Brightness": 0.21, "Color": 0.21,
        "Contrast": 0.21, "Sharpness": 0.21, "Posterize": 7.0, "Solarize": 255 - 255 * 7 / 30,
        "AutoContrast": 0.0, "Equalize": 0.0,
    }
    assert [name for name, _ in OPERATIONS] == list(expected)
    for name, value in expected.items():
        assert operation_strength(name, 7, 31, WIDTH, HEIGHT) == pytest.approx(value, rel=1e-6, abs=1e-6), name
    # Posterize keeps 8 bits at bin 0 and 4 at the last bin; Solarize's threshold falls from 255 to 0.
    assert [operation_strength("Posterize", m, 31, WIDTH, HEIGHT) for m in (0, 3, 4, 30)] == [8, 8, 7, 4]
    assert operation_strength("Solarize", 30, 31, WIDTH, HEIGHT) == 0.0


@pytest.mark.parametrize("strength", [0.07, -0.3])
def test_shear_x_moves_each_row_by_strength_times_its_height(strength):
    image = _image(1)
    out = _pixels(apply_operation(image, "ShearX", strength))
    src = _pixels(image)
    expected = np.zeros_like(src)
    for y in range(HEIGHT):
        for x in range(WIDTH):
            # PIL samples the pixel centre: (x + 0.5) + s (y + 0.5), nearest.
            sx = int(np.floor(x + 0.5 + strength * (y + 0.5)))
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


@pytest.mark.parametrize("name,strength,shift", [("TranslateX", 4.9, (0, 4)), ("TranslateX", -3.2, (0, -3)),
                                                 ("TranslateY", 5.0, (5, 0))])
def test_translate_shifts_by_whole_pixels_and_fills_black(name, strength, shift):
    image = _image(3)
    out, src = _pixels(apply_operation(image, name, strength)), _pixels(image)
    dy, dx = shift
    expected = np.zeros_like(src)
    expected[max(dy, 0):HEIGHT + min(dy, 0), max(dx, 0):WIDTH + min(dx, 0)] = \
        src[max(-dy, 0):HEIGHT - max(dy, 0), max(-dx, 0):WIDTH - max(dx, 0)]
    np.testing.assert_array_equal(out, expected)


def test_rotate_turns_counter_clockwise_about_the_centre():
    square = Image.fromarray(np.random.default_rng(4).integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB")
    np.testing.assert_array_equal(_pixels(apply_operation(square, "Rotate", 90.0)), np.rot90(_pixels(square)))
    small = _pixels(apply_operation(square, "Rotate", 7.0))
    assert (small[0, 0] == 0).all() and not np.array_equal(small, _pixels(square))


def test_colour_operations():
    image = _image(5)
    src = _pixels(image)
    np.testing.assert_array_equal(_pixels(apply_operation(image, "Brightness", -0.5)), np.round(src * 0.5 - 1e-9).clip(0, 255))
    np.testing.assert_array_equal(_pixels(apply_operation(image, "Posterize", 4.0)), src & 0xF0)
    threshold = 255 - 255 * 7 / 30
    np.testing.assert_array_equal(_pixels(apply_operation(image, "Solarize", threshold)),
                                  np.where(src < threshold, src, 255 - src))
    grey = Image.fromarray(np.full((HEIGHT, WIDTH, 3), [200, 100, 50], np.uint8), "RGB")
    desaturated = _pixels(apply_operation(grey, "Color", -0.9))
    assert np.ptp(desaturated[0, 0]) < np.ptp(_pixels(grey)[0, 0]) / 5  # channels pulled to their grey
    low = Image.fromarray((src // 4 + 60).astype(np.uint8), "RGB")
    stretched = _pixels(apply_operation(low, "AutoContrast", 0.0))
    assert stretched.reshape(-1, 3).min(0).tolist() == [0, 0, 0] and stretched.reshape(-1, 3).max(0).tolist() == [255] * 3
    assert _pixels(apply_operation(low, "Equalize", 0.0)).max() == 255
    assert apply_operation(image, "Identity", 0.0) is image


def test_randaugment_draws_from_its_generator_and_is_validated():
    image = _image(6)
    augment = RandAugment(num_ops=2, magnitude=7)
    first = _pixels(augment(image, random.Random(11)))
    np.testing.assert_array_equal(first, _pixels(augment(image, random.Random(11))))
    outputs = {_pixels(augment(image, random.Random(seed))).tobytes() for seed in range(20)}
    assert len(outputs) > 10
    for bad in ({"num_ops": 0}, {"magnitude": 31}, {"magnitude": 7.0}, {"num_ops": True}):
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
    image = _image(7).resize((80, 80))
    plain_out = plain(image, random.Random(0))
    blip_out = blip(image, random.Random(0))
    assert plain_out.shape == blip_out.shape == (3, 64, 64) and not np.allclose(plain_out, blip_out)
    for bad in ([0.0, 1.0], [0.6, 0.5], [0.5], "0.5", [True, 1.0]):
        with pytest.raises(ConfigError, match="crop_scale"):
            resolve_hparams({"crop_scale": bad})
    with pytest.raises(ConfigError, match="randaugment"):
        resolve_hparams({"randaugment": [2, 7]})
