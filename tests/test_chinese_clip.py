"""The Chinese-CLIP family: tiny round trips, interoperability with plain paddlenlp, features, preprocessing.

This file is also a rank program: ``python tests/test_chinese_clip.py --model-dir ... --batch ... --out ...``
runs under ``paddle.distributed.launch`` to show that the family's forward stays local on real ranks
while paddlenlp's own ``ChineseCLIPModel.forward`` gathers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

N_RANKS = 2
LOCAL_BATCH = 3


def _rank_main(argv: list[str]) -> None:
    import paddle
    import paddle.distributed as dist
    from paddlenlp.transformers import ChineseCLIPModel

    from vlretrieval.models.registry import get_family
    from vlretrieval.training.losses import exit_after_peers

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    paddle.set_device("cpu")
    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = np.load(args.batch)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    inputs = {key: paddle.to_tensor(batch[key][rows]) for key in ("pixel_values", "input_ids", "attention_mask")}

    ours = get_family("chinese_clip").load_model(args.model_dir)
    plain = ChineseCLIPModel.from_pretrained(args.model_dir)
    plain.eval()
    with paddle.no_grad():
        output = ours(**inputs)
        theirs = plain(**inputs)
        loss = ours.contrastive_loss(output)
    np.savez(
        Path(args.out) / f"rank{rank}.npz",
        image_features=output.image_features.numpy(),
        text_features=output.text_features.numpy(),
        plain_image_embeds=theirs.image_embeds.numpy(),
        loss=np.float64(float(loss)),
        world=np.int64(world),
    )
    exit_after_peers()


if __name__ == "__main__":
    _rank_main(sys.argv[1:])


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------

import math  # noqa: E402

import paddle  # noqa: E402
import pytest  # noqa: E402
from paddlenlp.transformers import (  # noqa: E402
    ChineseCLIPImageProcessor,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
    ChineseCLIPTokenizer,
)
from PIL import Image  # noqa: E402

from vlretrieval.errors import ConfigError, DownloadError  # noqa: E402
from vlretrieval.models import base  # noqa: E402
from vlretrieval.models.base import CLIP_MEAN, CLIP_STD, MODEL_INFO_FILE, ImageTransform, read_model_info  # noqa: E402
from vlretrieval.models.registry import CROSS_ENCODER, DUAL_ENCODER  # noqa: E402
from vlretrieval.models.chinese_clip import PRETRAINED_NAMES, ChineseCLIPDualEncoder  # noqa: E402
from vlretrieval.models.prepare import prepare_initial_model  # noqa: E402
from vlretrieval.models.registry import get_family, list_families  # noqa: E402
from vlretrieval.models.vocab import read_vocab  # noqa: E402
from vlretrieval.training.launcher import launch_env  # noqa: E402
from vlretrieval.models.losses import clip_contrastive_loss  # noqa: E402

paddle.set_device("cpu")

CAPTIONS = [
    "左上角有一个红色的圆形",
    "右下角有一个蓝色的正方形和一个绿色的三角形",
    "中间的黄色菱形",
    '图中共有三个物体："紫色圆形"、橙色正方形和红色三角形',
    "a red circle at the top left, 3 shapes",
    "左边是一个橙色的圆形",
]


@pytest.fixture(scope="module")
def family():
    return get_family("chinese_clip")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return prepare_initial_model(
        "chinese_clip", "tiny", tmp_path_factory.mktemp("models") / "tiny", vocab_texts=CAPTIONS, seed=0
    )


@pytest.fixture(scope="module")
def loaded(family, model_dir):
    return family.load_model(model_dir), family.load_tokenizer(model_dir)


def _inputs(family, tokenizer, n=3, seed=0, size=64):
    rng = np.random.default_rng(seed)
    pixels = paddle.to_tensor(rng.standard_normal((n, 3, size, size)).astype(np.float32))
    text = family.tokenize(tokenizer, CAPTIONS[:n], max_len=32)
    return pixels, paddle.to_tensor(text["input_ids"]), paddle.to_tensor(text["attention_mask"])


def _features(model, pixels, ids, mask):
    with paddle.no_grad():
        return model.encode_images(pixels).numpy(), model.encode_texts(ids, attention_mask=mask).numpy()


# -- registry and directory -------------------------------------------------------------------------


def test_registered_as_a_dual_encoder(family):
    assert "chinese_clip" in list_families(kind=DUAL_ENCODER)
    assert "chinese_clip" not in list_families(kind=CROSS_ENCODER)
    assert family.kind == DUAL_ENCODER and family.name == "chinese_clip"
    assert family.default_pretrained == "OFA-Sys/chinese-clip-vit-base-patch16" in PRETRAINED_NAMES
    assert family.train_max_len == family.eval_max_len == 52
    assert family.supports_recompute


def test_model_directory_is_self_contained(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model_state.pdparams", "vocab.txt", "tokenizer_config.json",
            "preprocessor_config.json", MODEL_INFO_FILE} <= names
    info = read_model_info(model_dir)
    assert info["family"] == "chinese_clip" and info["kind"] == DUAL_ENCODER and info["init"] == "tiny"
    assert info["image_size"] == 64 and info["embedding_dim"] == 64
    assert info["eval_max_len"] == 52 and info["max_text_len"] == 64
    assert info["vocab_size"] == len(read_vocab(model_dir / "vocab.txt"))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "chinese_clip" and config["projection_dim"] == 64
    assert config["vision_config"]["image_size"] == 64 and config["text_config"]["vocab_size"] == info["vocab_size"]
    processor = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(CLIP_MEAN) and processor["image_std"] == list(CLIP_STD)
    assert processor["size"] == {"shortest_edge": 64} and processor["crop_size"] == {"height": 64, "width": 64}
    assert not list(model_dir.parent.glob(".tiny.*"))


def test_save_load_gives_identical_features(loaded, family, model_dir, tmp_path):
    model, tokenizer = loaded
    pixels, ids, mask = _inputs(family, tokenizer)
    images, texts = _features(model, pixels, ids, mask)
    family.save_atomic(model, tokenizer, tmp_path / "copy")
    again = family.load_model(tmp_path / "copy")
    assert isinstance(again, ChineseCLIPDualEncoder) and not again.training
    for got, expected in zip(_features(again, pixels, ids, mask), (images, texts)):
        np.testing.assert_array_equal(got, expected)
    assert (tmp_path / "copy" / "vocab.txt").read_text() == (model_dir / "vocab.txt").read_text()


def test_directory_loads_in_plain_paddlenlp_with_identical_outputs(loaded, family, model_dir, tmp_path):
    model, tokenizer = loaded
    plain = ChineseCLIPModel.from_pretrained(str(model_dir))
    plain.eval()
    plain_tokenizer = ChineseCLIPTokenizer.from_pretrained(str(model_dir))
    assert plain_tokenizer.convert_tokens_to_ids(["[CLS]", "红"]) == tokenizer.convert_tokens_to_ids(["[CLS]", "红"])
    pixels, ids, mask = _inputs(family, tokenizer)
    images, texts = _features(model, pixels, ids, mask)
    with paddle.no_grad():
        output = plain(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        raw_text = plain.get_text_features(input_ids=ids, attention_mask=mask).numpy()
    np.testing.assert_allclose(output.image_embeds.numpy(), images, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(output.text_embeds.numpy(), texts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(raw_text / np.linalg.norm(raw_text, axis=1, keepdims=True), texts, rtol=1e-5, atol=1e-6)
    # Same logits as paddlenlp: exp(logit_scale) * text @ image.T
    with paddle.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    logits = float(ours.logit_scale) * ours.text_features.numpy() @ ours.image_features.numpy().T
    np.testing.assert_allclose(output.logits_per_text.numpy(), logits, rtol=1e-4, atol=1e-5)

    # ... and the other way round: a directory written by plain paddlenlp loads into the family.
    plain.save_pretrained(str(tmp_path / "plain"))
    plain_tokenizer.save_pretrained(str(tmp_path / "plain"))
    back = family.load_model(tmp_path / "plain")
    for got, expected in zip(_features(back, pixels, ids, mask), (images, texts)):
        np.testing.assert_array_equal(got, expected)


def test_pretrained_names_fail_with_a_download_error(family):
    # No hub is reachable here; a name that exists nowhere fails the same way with or without network.
    with pytest.raises(DownloadError, match=r"no-such-chinese-clip.*OFA-Sys/chinese-clip-vit-base-patch16.*local directory"):
        family.load_model("OFA-Sys/no-such-chinese-clip")


def test_missing_local_directory_is_a_config_error(family, tmp_path):
    with pytest.raises(ConfigError, match="model directory not found"):
        family.load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        family.load_tokenizer(tmp_path / "empty")


# -- features and forward ---------------------------------------------------------------------------


def test_features_are_projected_l2_normalised_and_forward_is_local(loaded, family):
    model, tokenizer = loaded
    pixels, ids, mask = _inputs(family, tokenizer)
    with paddle.no_grad():
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        unnormalised = model.get_image_features(pixel_values=pixels).numpy()
    assert out.image_features.shape == [3, 64] == out.text_features.shape
    assert model.embedding_dim == 64 == model.config.projection_dim
    np.testing.assert_allclose(np.linalg.norm(out.image_features.numpy(), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.text_features.numpy(), axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(np.linalg.norm(unnormalised, axis=1), 1.0)  # the normalisation is ours
    # Three different images and captions give three different embeddings.
    assert np.abs(out.image_features.numpy()[0] - out.image_features.numpy()[1]).max() > 1e-3
    assert np.abs(out.text_features.numpy()[0] - out.text_features.numpy()[1]).max() > 1e-3
    assert float(out.logit_scale) == pytest.approx(1 / 0.07, rel=1e-5)
    with pytest.raises(ValueError, match="both"):
        model(pixel_values=pixels)


def test_text_feature_is_the_projected_cls_row(loaded, family):
    model, tokenizer = loaded
    _, ids, mask = _inputs(family, tokenizer)
    with paddle.no_grad():
        hidden = model.text_model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state.numpy()
        texts = model.encode_texts(ids, attention_mask=mask).numpy()
    projected = hidden[:, 0] @ model.text_projection.numpy()
    np.testing.assert_allclose(texts, projected / np.linalg.norm(projected, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_padding_is_masked_even_without_a_mask(loaded, family):
    model, tokenizer = loaded
    short = family.tokenize(tokenizer, [CAPTIONS[2]], max_len=32)
    padded = family.tokenize(tokenizer, [CAPTIONS[2]], max_len=32, pad_to_max=True)
    assert padded["input_ids"].shape == (1, 32) and short["input_ids"].shape[1] < 32
    with paddle.no_grad():
        a = model.encode_texts(paddle.to_tensor(short["input_ids"]), attention_mask=paddle.to_tensor(short["attention_mask"]))
        b = model.encode_texts(paddle.to_tensor(padded["input_ids"]), attention_mask=paddle.to_tensor(padded["attention_mask"]))
        # paddlenlp's get_text_features would attend to the padding when no mask is given.
        c = model.encode_texts(paddle.to_tensor(padded["input_ids"]))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    np.testing.assert_allclose(c.numpy(), b.numpy(), atol=1e-6)


def test_logit_scale_clamp_is_in_place(family, model_dir):
    model = family.load_model(model_dir)
    parameter = model.log_temperature
    assert "logit_scale" in dict(model.named_parameters()) and dict(model.named_parameters())["logit_scale"] is parameter
    parameter.set_value(paddle.to_tensor([10.0]))
    model.clamp_logit_scale_()
    assert model.log_temperature is parameter
    assert float(model.state_dict()["logit_scale"]) == pytest.approx(math.log(100.0), rel=1e-6)
    assert float(model.logit_scale()) == pytest.approx(100.0, rel=1e-5)
    parameter.set_value(paddle.to_tensor([-3.0]))
    model.clamp_logit_scale_()
    assert float(parameter) == 0.0 and float(model.logit_scale()) == 1.0
    parameter.set_value(paddle.to_tensor([2.0]))
    model.clamp_logit_scale_()
    assert float(parameter) == pytest.approx(2.0)


def test_no_weight_decay_names(loaded):
    model, _ = loaded
    names = model.no_weight_decay_names()
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert {"logit_scale", "vision_model.class_embedding", "vision_model.ln_pre.weight",
            "vision_model.ln_post.weight", "vision_model.ln_post.bias"} <= names
    assert all(len(params[name].shape) < 2 or ".ln_" in name for name in names - {"logit_scale"})
    # Every matrix is decayed: projections, embeddings, attention and MLP weights.
    assert not any(len(params[name].shape) >= 2 for name in names)
    assert {"text_projection", "vision_projection", "text_model.embeddings.word_embeddings.weight"}.isdisjoint(names)


def test_gradients_reach_every_parameter(family, model_dir):
    model = family.load_model(model_dir)
    tokenizer = family.load_tokenizer(model_dir)
    pixels, ids, mask = _inputs(family, tokenizer, n=4)
    output = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    clip_contrastive_loss(output.image_features, output.text_features, output.logit_scale).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    # Pooler-free text tower: nothing is left out of the graph (DataParallel would stall on it).
    assert missing == []
    assert float(model.log_temperature.grad.abs().sum()) > 0


def test_recompute_gives_the_same_loss_and_gradients(family, model_dir):
    model = family.load_model(model_dir)  # eval mode: no dropout, so both passes compute one function
    tokenizer = family.load_tokenizer(model_dir)
    pixels, ids, mask = _inputs(family, tokenizer, n=4)

    def loss_and_grads():
        model.clear_gradients()
        output = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        loss = clip_contrastive_loss(output.image_features, output.text_features, output.logit_scale)
        loss.backward()
        return float(loss), {name: p.grad.numpy().copy() for name, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    # What the Trainer does with recompute on: both towers' encoders are switched.
    switched = [layer for layer in model.sublayers() if hasattr(layer, "enable_recompute")]
    assert len(switched) == 2
    for layer in switched:
        layer.enable_recompute = True
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, plain_grads[name], rtol=1e-5, atol=1e-7, err_msg=name)


# -- tiny construction ------------------------------------------------------------------------------


def test_tiny_build_is_deterministic_and_keeps_the_callers_rng(family, model_dir):
    paddle.seed(123)
    expected_next = paddle.randn([4]).numpy()
    paddle.seed(123)
    first, _ = family.build_tiny(model_dir / "vocab.txt", seed=0)
    np.testing.assert_array_equal(paddle.randn([4]).numpy(), expected_next)
    second, _ = family.build_tiny(model_dir / "vocab.txt", seed=0)
    other, _ = family.build_tiny(model_dir / "vocab.txt", seed=1)
    saved = family.load_model(model_dir)  # seed 0 through prepare_initial_model
    for name, value in first.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), second.state_dict()[name].numpy(), err_msg=name)
        np.testing.assert_array_equal(value.numpy(), saved.state_dict()[name].numpy(), err_msg=name)
    assert any(not np.array_equal(v.numpy(), other.state_dict()[k].numpy()) for k, v in first.state_dict().items())
    # The text tower gets the width-scaled init, the ViT keeps CLIP's.
    weight = first.state_dict()["text_model.encoder.layers.0.linear1.weight"].numpy()
    assert weight.std() == pytest.approx(0.07, rel=0.05)


def test_tiny_overrides_and_their_validation(family, model_dir):
    model, _ = family.build_tiny(
        model_dir / "vocab.txt", image_size=32, patch_size=8, text_layers=1, text_hidden_size=32, projection_dim=16
    )
    assert family.image_size(model) == 32 and model.config.text_config.num_hidden_layers == 1
    assert model.embedding_dim == 16
    with paddle.no_grad():
        # Unequal tower widths are fine: the projections map both to projection_dim.
        assert model.encode_images(paddle.zeros([2, 3, 32, 32])).shape == [2, 16]
        assert model.encode_texts(paddle.to_tensor([[1, 5, 2]])).shape == [1, 16]
    with pytest.raises(ConfigError, match="unknown chinese_clip tiny"):
        family.build_tiny(model_dir / "vocab.txt", hidden=3)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        family.build_tiny(model_dir / "vocab.txt", image_size=60)
    with pytest.raises(ConfigError, match="divisible"):
        family.build_tiny(model_dir / "vocab.txt", text_heads=3)


# -- tokenization -----------------------------------------------------------------------------------


def test_tokenizer_truncates_to_max_len(loaded, family):
    _, tokenizer = loaded
    long_text = "左上角有一个红色的圆形" * 10
    for max_len in (8, 52):
        encoded = family.tokenize(tokenizer, [long_text, "红色"], max_len=max_len)
        assert encoded["input_ids"].shape == (2, max_len) and encoded["input_ids"].dtype == np.int64
        first = encoded["input_ids"][0].tolist()
        assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id
        assert tokenizer.convert_ids_to_tokens(first[1:4]) == ["左", "上", "角"]
        assert encoded["attention_mask"][0].sum() == max_len
        assert encoded["attention_mask"][1].sum() == 4 and encoded["input_ids"][1][4:].tolist() == [0] * (max_len - 4)
    with pytest.raises(ValueError, match="max_len"):
        family.tokenize(tokenizer, ["红色"], max_len=1)


def test_tokenizer_lowercases_and_maps_curly_quotes_like_the_reference(loaded, family):
    _, tokenizer = loaded
    ids = family.tokenize(tokenizer, ["\u201c红色\u201dRED"], max_len=16)["input_ids"][0].tolist()
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", '"', "红", "色", '"', "red", "[SEP]"]


# -- image preprocessing ----------------------------------------------------------------------------


def test_image_transform_uses_clip_normalisation(loaded, family):
    model, _ = loaded
    transform = family.image_transform(model, train=False)
    assert transform == ImageTransform(image_size=64, train=False, mean=CLIP_MEAN, std=CLIP_STD)
    assert family.image_transform(64, train=True, hflip=False) == ImageTransform(
        image_size=64, train=True, hflip=False, mean=CLIP_MEAN, std=CLIP_STD
    )
    out = transform(Image.new("RGB", (100, 50), (255, 255, 255)))
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 10, 10], (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), rtol=1e-5)
    black = transform(Image.new("RGB", (64, 64), (0, 0, 0)))
    np.testing.assert_allclose(black[:, 0, 0], -np.array(CLIP_MEAN) / np.array(CLIP_STD), rtol=1e-5)
    assert not np.allclose(black[:, 0, 0], -np.array(base.IMAGENET_MEAN) / np.array(base.IMAGENET_STD), atol=1e-2)


def test_saved_processor_matches_the_eval_transform(loaded, family, model_dir):
    model, _ = loaded
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8))
    ours = family.image_transform(model, train=False)(image)
    for processor in (
        ChineseCLIPImageProcessor.from_pretrained(str(model_dir)),
        ChineseCLIPProcessor.from_pretrained(str(model_dir)).image_processor,
    ):
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
        assert theirs.shape == ours.shape
        np.testing.assert_allclose(theirs, ours, atol=1e-4)


# -- real ranks -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_forward_does_not_gather_on_real_ranks(family, model_dir, tmp_path):
    """Two gloo ranks: paddlenlp's forward returns the gathered batch, ours each rank's own rows."""
    tokenizer = family.load_tokenizer(model_dir)
    n = N_RANKS * LOCAL_BATCH
    rng = np.random.default_rng(7)
    text = family.tokenize(tokenizer, CAPTIONS[:n], max_len=32)
    batch = {
        "pixel_values": rng.standard_normal((n, 3, 64, 64)).astype(np.float32),
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
    }
    np.savez(tmp_path / "batch.npz", **batch)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "paddle.distributed.launch",
        "--nproc_per_node", str(N_RANKS), "--log_dir", str(tmp_path / "logs"), "--max_restart", "0",
        __file__, "--model-dir", str(model_dir), "--batch", str(tmp_path / "batch.npz"), "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=launch_env(N_RANKS, use_gpu=False), capture_output=True, text=True, timeout=300)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((tmp_path / "logs").glob("workerlog.*")))
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{logs}"

    model = family.load_model(model_dir)
    inputs = {key: paddle.to_tensor(value) for key, value in batch.items()}
    with paddle.no_grad():
        full = model(**inputs)
        full_loss = float(model.contrastive_loss(full))
    losses = []
    for rank in range(N_RANKS):
        result = np.load(out / f"rank{rank}.npz")
        assert int(result["world"]) == N_RANKS
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        # Ours: this rank's rows only, equal to the single-process features of those rows.
        np.testing.assert_allclose(result["image_features"], full.image_features.numpy()[rows], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result["text_features"], full.text_features.numpy()[rows], rtol=1e-5, atol=1e-6)
        # paddlenlp's: every rank's rows (own first), so the process group really was there.
        assert result["plain_image_embeds"].shape == (n, 64)
        np.testing.assert_allclose(result["plain_image_embeds"][:LOCAL_BATCH], result["image_features"], rtol=1e-5, atol=1e-6)
        losses.append(float(result["loss"]))
    # The loss gathers once: the ranks' mean is the CLIP loss of the whole batch.
    assert np.mean(losses) == pytest.approx(full_loss, rel=1e-5)
