"""Model families: the tiny ERNIE-ViL round trip, features, tokenizer, registry, vocabulary, transforms."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import paddle
import pytest
from PIL import Image

from vlretrieval.errors import ConfigError
from vlretrieval.models import base
from vlretrieval.models.base import MODEL_INFO_FILE, ImageTransform, read_model_info
from vlretrieval.models.registry import CROSS_ENCODER, DUAL_ENCODER, FamilySpec
from vlretrieval.models.prepare import prepare_initial_model
from vlretrieval.models.registry import get_family, list_families, register_family
from vlretrieval.models.vocab import SPECIAL_TOKENS, build_vocab, build_vocab_file, read_vocab, write_vocab

paddle.set_device("cpu")

CAPTIONS = [
    "左上角有一个红色的圆形",
    "右下角有一个蓝色的正方形和一个绿色的三角形",
    "中间的黄色菱形",
    "图中共有三个物体：紫色圆形、橙色正方形和红色三角形",
    "a red circle at the top left, 3 shapes",
]


@pytest.fixture(scope="module")
def family():
    return get_family("ernie_vil")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return prepare_initial_model("ernie_vil", "tiny", tmp_path_factory.mktemp("models") / "tiny", vocab_texts=CAPTIONS, seed=0)


def _inputs(family, tokenizer, n=3, seed=0):
    rng = np.random.default_rng(seed)
    pixels = paddle.to_tensor(rng.standard_normal((n, 3, 64, 64)).astype(np.float32))
    text = family.tokenize(tokenizer, CAPTIONS[:n], max_len=32)
    return pixels, paddle.to_tensor(text["input_ids"]), paddle.to_tensor(text["attention_mask"])


# -- registry ---------------------------------------------------------------------------------------


def test_registry_lookups(family):
    assert "ernie_vil" in list_families()
    assert "ernie_vil" in list_families(kind=DUAL_ENCODER)
    assert "ernie_vil" not in list_families(kind=CROSS_ENCODER)
    assert family.kind == DUAL_ENCODER and family.name == "ernie_vil"
    assert family.default_pretrained == "PaddlePaddle/ernie_vil-2.0-base-zh"
    with pytest.raises(ConfigError, match="unknown model family 'nope'.*ernie_vil"):
        get_family("nope")
    with pytest.raises(ValueError, match="kind"):
        list_families(kind="both")


def test_register_family_rejects_duplicates_and_bad_kinds(family):
    assert register_family(family) is family  # re-registering the same object is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_family(type(family)(name="ernie_vil"))
    with pytest.raises(ValueError, match="kind"):
        FamilySpec("x", "triple_encoder")
    # The registered kind must be the one the model class implements.
    with pytest.raises(ValueError, match="registered as a cross_encoder.*implements a dual_encoder"):
        register_family(type(family)(name="ernie_vil_as_cross"), spec=FamilySpec(__name__, CROSS_ENCODER))
    with pytest.raises(ValueError, match="built-in family"):
        register_family(family, spec=FamilySpec(__name__, DUAL_ENCODER), replace=True)


# -- vocabulary -------------------------------------------------------------------------------------


def test_vocab_is_deterministic_and_order_independent():
    first = build_vocab(CAPTIONS)
    shuffled = list(CAPTIONS)
    random.Random(1).shuffle(shuffled)
    assert build_vocab(shuffled) == first
    assert tuple(first[: len(SPECIAL_TOKENS)]) == ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
    assert len(set(first)) == len(first)
    # Character level for Chinese; Latin words are tokens, and their characters pieces for unseen words.
    assert "红" in first and "##红" not in first
    assert {"red", "circle", "r", "##e", "##d", "3"} <= set(first)
    # Most frequent piece first after the specials ("个" and "色" appear the most).
    counts = {tok: sum(c.count(tok) for c in CAPTIONS) for tok in ("个", "色", "菱")}
    assert first.index("色") < first.index("菱") and counts["色"] > counts["菱"]


def test_vocab_keeps_known_english_words_whole_and_spells_unseen_ones(tmp_path):
    from paddlenlp.transformers import BertTokenizer

    build_vocab_file(CAPTIONS, tmp_path / "vocab.txt")
    tokenizer = BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=True)
    assert tokenizer.tokenize("A red circle") == ["a", "red", "circle"]
    assert tokenizer.tokenize("tired") == ["t", "##i", "##r", "##e", "##d"]
    assert "[UNK]" not in tokenizer.tokenize("left cart")


def test_vocab_file_roundtrip_and_validation(tmp_path):
    tokens = build_vocab_file(CAPTIONS, tmp_path / "vocab.txt")
    assert read_vocab(tmp_path / "vocab.txt") == tokens
    assert (tmp_path / "vocab.txt").read_bytes() == ("\n".join(tokens) + "\n").encode("utf-8")
    with pytest.raises(ValueError, match="start with"):
        write_vocab(["a", "b"], tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="duplicate"):
        write_vocab(list(SPECIAL_TOKENS) + ["x", "x"], tmp_path / "bad.txt")
    assert not (tmp_path / "bad.txt").exists()
    assert build_vocab(CAPTIONS, max_size=7) == build_vocab(CAPTIONS)[:7]
    rare = build_vocab(CAPTIONS, min_count=3)
    assert "菱" not in rare and "色" in rare


# -- tiny model -------------------------------------------------------------------------------------


def test_model_directory_is_self_contained(model_dir, family):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model_state.pdparams", "vocab.txt", "tokenizer_config.json", "preprocessor_config.json", MODEL_INFO_FILE} <= names
    info = read_model_info(model_dir)
    assert info["family"] == "ernie_vil" and info["kind"] == DUAL_ENCODER
    assert info["init"] == "tiny" and info["image_size"] == 64 and info["embedding_dim"] == 64
    assert info["vocab_size"] == len(read_vocab(model_dir / "vocab.txt"))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 64 and config["text_config"]["vocab_size"] == info["vocab_size"]
    assert not list(model_dir.parent.glob(".tiny.*"))  # no staging directory left behind


def test_save_load_gives_identical_features(model_dir, family, tmp_path):
    model = family.load_model(model_dir)
    tokenizer = family.load_tokenizer(model_dir)
    pixels, ids, mask = _inputs(family, tokenizer)
    with paddle.no_grad():
        images, texts = model.encode_images(pixels).numpy(), model.encode_texts(ids, attention_mask=mask).numpy()
    family.save_atomic(model, tokenizer, tmp_path / "copy")
    again = family.load_model(tmp_path / "copy")
    with paddle.no_grad():
        np.testing.assert_array_equal(again.encode_images(pixels).numpy(), images)
        np.testing.assert_array_equal(again.encode_texts(ids, attention_mask=mask).numpy(), texts)
    assert (tmp_path / "copy" / "vocab.txt").read_text() == (model_dir / "vocab.txt").read_text()


def test_padding_is_masked(model_dir, family):
    model = family.load_model(model_dir)
    tokenizer = family.load_tokenizer(model_dir)
    short = family.tokenize(tokenizer, [CAPTIONS[2]], max_len=32)
    padded = family.tokenize(tokenizer, [CAPTIONS[2]], max_len=32, pad_to_max=True)
    assert padded["input_ids"].shape == (1, 32) and short["input_ids"].shape[1] < 32
    with paddle.no_grad():
        a = model.encode_texts(paddle.to_tensor(short["input_ids"]), attention_mask=paddle.to_tensor(short["attention_mask"]))
        b = model.encode_texts(paddle.to_tensor(padded["input_ids"]), attention_mask=paddle.to_tensor(padded["attention_mask"]))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_tiny_build_is_deterministic_and_keeps_the_callers_rng(model_dir, family):
    paddle.seed(123)
    expected_next = paddle.randn([4]).numpy()
    paddle.seed(123)
    first, _ = family.build_tiny(model_dir / "vocab.txt", seed=0)
    after_build = paddle.randn([4]).numpy()
    np.testing.assert_array_equal(after_build, expected_next)
    second, _ = family.build_tiny(model_dir / "vocab.txt", seed=0)
    other, _ = family.build_tiny(model_dir / "vocab.txt", seed=1)
    loaded = family.load_model(model_dir)  # saved from seed 0 by prepare_initial_model
    for name, value in first.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), second.state_dict()[name].numpy(), err_msg=name)
        np.testing.assert_array_equal(value.numpy(), loaded.state_dict()[name].numpy(), err_msg=name)
    assert any(
        not np.array_equal(value.numpy(), other.state_dict()[name].numpy()) for name, value in first.state_dict().items()
    )


def test_tiny_overrides_and_their_validation(model_dir, family):
    model, _ = family.build_tiny(model_dir / "vocab.txt", image_size=32, patch_size=8, text_layers=1)
    assert family.image_size(model) == 32 and model.config.text_config.num_hidden_layers == 1
    with paddle.no_grad():
        assert model.encode_images(paddle.zeros([1, 3, 32, 32])).shape == [1, 64]
    with pytest.raises(ConfigError, match="unknown ernie_vil tiny"):
        family.build_tiny(model_dir / "vocab.txt", hidden=3)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        family.build_tiny(model_dir / "vocab.txt", image_size=60)
    with pytest.raises(ConfigError, match="vision_hidden_size == text_hidden_size"):
        family.build_tiny(model_dir / "vocab.txt", text_hidden_size=32)


def test_tokenizer_truncates_to_max_len(model_dir, family):
    tokenizer = family.load_tokenizer(model_dir)
    long_text = "左上角有一个红色的圆形" * 10
    for max_len in (8, 32):
        encoded = family.tokenize(tokenizer, [long_text, "红色"], max_len=max_len)
        assert encoded["input_ids"].shape == (2, max_len)
        first = encoded["input_ids"][0].tolist()
        assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id
        assert encoded["attention_mask"][0].sum() == max_len
        # The short text is padded with [PAD] (id 0) and masked out.
        assert encoded["attention_mask"][1].sum() == 4 and encoded["input_ids"][1][4:].tolist() == [0] * (max_len - 4)
    assert tokenizer.convert_ids_to_tokens(family.tokenize(tokenizer, ["红色xyz"], max_len=8)["input_ids"][0].tolist()) == [
        "[CLS]", "红", "色", "[UNK]", "[SEP]"
    ]
    with pytest.raises(ValueError, match="max_len"):
        family.tokenize(tokenizer, ["红色"], max_len=1)


def test_logit_scale_clamp_is_in_place(model_dir, family):
    model = family.load_model(model_dir)
    model.temperature.set_value(paddle.to_tensor([10.0]))
    model.clamp_logit_scale_()
    assert float(model.temperature) == pytest.approx(math.log(100.0), rel=1e-6)
    assert float(model.logit_scale()) == pytest.approx(100.0, rel=1e-5)
    model.temperature.set_value(paddle.to_tensor([-3.0]))
    model.clamp_logit_scale_()
    assert float(model.temperature) == 0.0
    assert model.no_weight_decay_names() == {"temperature"}


def test_missing_local_directory_is_a_config_error(family, tmp_path):
    with pytest.raises(ConfigError, match="model directory not found"):
        family.load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        family.load_model(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a model directory saved by vlretrieval"):
        read_model_info(tmp_path / "empty")
    assert base.is_local_source("./x") and base.is_local_source(tmp_path)
    assert not base.is_local_source("PaddlePaddle/ernie_vil-2.0-base-zh")


def test_tiny_init_needs_captions(tmp_path):
    with pytest.raises(ConfigError, match="vocab_texts"):
        prepare_initial_model("ernie_vil", "tiny", tmp_path / "m")
    assert not (tmp_path / "m").exists()


# -- image preprocessing ----------------------------------------------------------------------------


def _asymmetric_image(size=64) -> Image.Image:
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[:, : size // 4] = (255, 0, 0)  # red band on the left only
    return Image.fromarray(array)


def test_eval_transform_resizes_and_normalises(family, model_dir):
    model = family.load_model(model_dir)
    transform = family.image_transform(model, train=False)
    assert transform == ImageTransform(image_size=64, train=False)
    out = transform(Image.new("RGB", (100, 50), (255, 255, 255)))
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    expected = (1.0 - np.array(base.IMAGENET_MEAN)) / np.array(base.IMAGENET_STD)
    np.testing.assert_allclose(out[:, 10, 10], expected, rtol=1e-5)


def test_train_transform_flip_is_optional():
    image = _asymmetric_image()
    # A full-image "crop" isolates the flip from the crop.
    no_crop = dict(image_size=64, train=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    plain = ImageTransform(image_size=64)(image)
    mirrored = plain[:, :, ::-1]
    never = ImageTransform(hflip=False, **no_crop)
    rng = random.Random(0)
    assert all(np.allclose(never(image, rng), plain, atol=1e-5) for _ in range(20))
    sometimes = ImageTransform(hflip=True, **no_crop)
    outcomes = [sometimes(image, rng) for _ in range(40)]
    flipped = sum(np.allclose(o, mirrored, atol=1e-5) for o in outcomes)
    kept = sum(np.allclose(o, plain, atol=1e-5) for o in outcomes)
    assert flipped + kept == 40 and 5 < flipped < 35


def test_train_crop_keeps_most_of_the_image():
    transform = ImageTransform(image_size=32, train=True, hflip=False)
    rng = random.Random(3)
    for _ in range(50):
        left, top, right, bottom = transform._crop_box(64, 48, rng)
        area = (right - left) * (bottom - top)
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        assert 0.85 * 64 * 48 <= area <= 64 * 48
    assert transform(_asymmetric_image(), rng).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="crop_scale"):
        ImageTransform(image_size=32, crop_scale=(0.0, 1.0))


@pytest.mark.parametrize("family_name", ["ernie_vil", "chinese_clip", "bert_clip"])
def test_tiny_architecture_overrides_are_checked(family_name, tmp_path):
    from vlretrieval.models.registry import get_family

    family = get_family(family_name)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "红", "圆"]) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"unknown {family_name} tiny architecture keys \\['depth'\\]"):
        family.build_tiny(vocab, depth=3)
    with pytest.raises(ConfigError, match="image_size 64 is not a multiple of patch_size 12"):
        family.build_tiny(vocab, patch_size=12)
    with pytest.raises(ConfigError, match="text_hidden_size must be divisible by text_heads"):
        family.build_tiny(vocab, text_heads=3)
    model, _ = family.build_tiny(vocab, image_size=32)
    assert family.image_size(model) == 32


@pytest.mark.parametrize("mean,std", [(base.IMAGENET_MEAN, base.IMAGENET_STD),
                                      ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
def test_normalisation_by_table_is_bit_identical_to_the_arithmetic(mean, std):
    # Every 8-bit value in every channel, laid out as a 256 x 3 image, plus a random photo-sized one.
    every_value = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)
    photo = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for pixels in (every_value, photo):
        arithmetic = (pixels.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        got = base.normalised_chw(pixels, mean, std)
        assert got.dtype == np.float32 and got.shape == (3, *pixels.shape[:2]) and got.flags.c_contiguous
        assert got.tobytes() == np.ascontiguousarray(arithmetic.transpose(2, 0, 1)).tobytes()
