"""BridgeTower: fidelity of the paddle port and converter to HF transformers, tiny builds, save/load."""

from __future__ import annotations

import json
import math

import numpy as np
import paddle
import pytest

from vlretrieval.errors import ConfigError
from vlretrieval.models.base import CLIP_MEAN, read_model_info
from vlretrieval.models.registry import CROSS_ENCODER
from vlretrieval.models.bridgetower import (
    FAMILY,
    ITC_DIM,
    BridgeTowerForRetrieval,
    ConversionError,
    ConversionReport,
    config_from_hf,
    convert_bridgetower_checkpoint,
    convert_state_dict,
    main,
)
from vlretrieval.models.prepare import prepare_initial_model
from vlretrieval.models.vocab import build_vocab_file

paddle.set_device("cpu")

CAPTIONS = ["a red circle", "two blue squares on the left", "a green triangle"]

# RoBERTa ids: <s>=0, <pad>=1, </s>=2; the first text is padded.
HF_INPUT_IDS = np.array([[0, 5, 17, 9, 2, 1, 1], [0, 8, 40, 11, 23, 12, 2]], dtype=np.int64)
HF_MASK = (HF_INPUT_IDS != 1).astype(np.int64)

# A byte-level BPE vocabulary just large enough to spell the test words.
ROBERTA_VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "a": 5, "b": 6, "Ġ": 7, "Ġb": 8, "Ġa": 9}
ROBERTA_MERGES = "#version: 0.2\nĠ b\nĠ a\n"


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    build_vocab_file(CAPTIONS, path)
    return path


@pytest.fixture(scope="module")
def tiny(vocab_file):
    return FAMILY.build_tiny(vocab_file, seed=0)


def _pixels(n, size, seed=0):
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32))


# -- fidelity against HF transformers ----------------------------------------------------------------


def _hf_config(transformers):
    return transformers.BridgeTowerConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_hidden_layers=2,  # cross-modal layers; with 3 uni-modal layers one runs before the bridges
        text_config={
            "vocab_size": 50,
            "hidden_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "intermediate_size": 192,
            "max_position_embeddings": 20,
            "pad_token_id": 1,
        },
        # HF's contrastive head adds the modality embedding before the transform, so the vision
        # width must equal the cross-modal one for the HF reference to run at all.
        vision_config={"hidden_size": 128, "num_hidden_layers": 3, "patch_size": 8, "image_size": 32},
        contrastive_hidden_size=ITC_DIM,
        logit_scale_init_value=2.6592,
    )


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = _hf_config(transformers)
    torch.manual_seed(0)
    contrastive = transformers.BridgeTowerForContrastiveLearning(config).eval()
    retrieval = transformers.BridgeTowerForImageAndTextRetrieval(config).eval()
    with torch.no_grad():
        # HF initialises LayerNorms to 1/0 and biases to 0; noise makes a swapped weight/bias visible.
        for model in (contrastive, retrieval):
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        retrieval.bridgetower.load_state_dict(contrastive.bridgetower.state_dict())
    root = tmp_path_factory.mktemp("hf")
    contrastive.save_pretrained(root / "itc", safe_serialization=True)
    retrieval.save_pretrained(root / "itm", safe_serialization=False)
    (root / "itm" / "vocab.json").write_text(json.dumps(ROBERTA_VOCAB), encoding="utf-8")
    (root / "itm" / "merges.txt").write_text(ROBERTA_MERGES, encoding="utf-8")
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        inputs = dict(
            input_ids=torch.from_numpy(HF_INPUT_IDS),
            attention_mask=torch.from_numpy(HF_MASK),
            pixel_values=torch.from_numpy(pixels),
        )
        itm = retrieval(**inputs).logits.numpy()
        itc = contrastive(**inputs)
    expected = {
        "itm": itm,
        "text": itc.text_embeds.numpy(),
        "image": itc.image_embeds.numpy(),
        "cross": itc.cross_embeds.numpy(),
        "logit_scale": float(contrastive.logit_scale.detach().exp()),
    }
    return root, config, pixels, expected


@pytest.fixture(scope="module")
def converted(hf_checkpoints, tmp_path_factory):
    root, _, _, _ = hf_checkpoints
    out = tmp_path_factory.mktemp("converted") / "bt"
    # The retrieval save brings the ITM head and the tokenizer, the contrastive save the ITC heads.
    return convert_bridgetower_checkpoint([root / "itm", root / "itc"], out)


def test_converted_model_matches_hf(hf_checkpoints, converted):
    _, _, pixels, expected = hf_checkpoints
    model = FAMILY.load_model(converted)
    ids, mask, px = paddle.to_tensor(HF_INPUT_IDS), paddle.to_tensor(HF_MASK), paddle.to_tensor(pixels)
    with paddle.no_grad():
        itm = model.itm_logits(ids, mask, px).numpy()
        text_states = model.encode_texts_unimodal(ids, mask)
        image_states = model.encode_images_unimodal(px)
        pooled = model.cross_modal(text_states, mask, image_states)[2]
        ours = {
            "itm": itm,
            "text": model.itc_text_features(text_states, mask).numpy(),
            "image": model.itc_image_features(image_states).numpy(),
            "cross": model.itc_cross_features(pooled).numpy(),
        }
    diffs = {key: float(np.abs(ours[key] - expected[key]).max()) for key in ours}
    print("max abs diff vs HF:", diffs)
    for key, diff in diffs.items():
        assert diff < 1e-4, (key, diff)
    assert np.abs(expected["itm"]).max() > 1e-2  # the comparison is not between two near-zero outputs
    assert model.logit_scale().item() == pytest.approx(expected["logit_scale"], rel=1e-6)

    info = read_model_info(converted)
    assert info["family"] == "bridgetower" and info["kind"] == CROSS_ENCODER
    assert info["conversion"]["fresh"] == [] and info["tokenizer_class"] == "RobertaBPETokenizer"
    assert info["max_text_len"] == 20 - 1 - 1 and info["itc_dim"] == ITC_DIM and info["image_size"] == 32
    # The text pooler and the MLM head are unused by the forward pass and reported, not converted.
    assert any(key.startswith("bridgetower.text_model.pooler.") for key in info["conversion"]["ignored"])
    assert model.config.text_config.pad_token_id == 1


def test_resized_model_matches_hf_interpolated_positions(hf_checkpoints, converted, tmp_path):
    """Fine-tuning resolution (the authors': 384 px from 288 px weights): the resized model's ITM
    logits on larger images equal HF's with ``interpolate_pos_encoding`` (bicubic, class row kept)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root, _, _, _ = hf_checkpoints
    retrieval = transformers.BridgeTowerForImageAndTextRetrieval.from_pretrained(root / "itm").eval()
    pixels = np.random.default_rng(3).standard_normal((2, 3, 48, 48)).astype(np.float32)
    with torch.no_grad():
        pooled = retrieval.bridgetower(
            input_ids=torch.from_numpy(HF_INPUT_IDS), attention_mask=torch.from_numpy(HF_MASK),
            pixel_values=torch.from_numpy(pixels), interpolate_pos_encoding=True,
        ).pooler_output
        expected = retrieval.itm_score(pooled).numpy()

    out = prepare_initial_model("bridgetower", str(converted), tmp_path / "init", image_size=48)
    model = FAMILY.load_model(out)
    assert FAMILY.image_size(model) == 48 and model.vision.pos_embed.weight.shape[0] == 1 + 6 * 6
    info = read_model_info(out)
    assert info["image_size"] == 48 and info["image_resize"] == {"from": 32, "to": 48}
    with paddle.no_grad():
        ours = model.itm_logits(paddle.to_tensor(HF_INPUT_IDS), paddle.to_tensor(HF_MASK), paddle.to_tensor(pixels)).numpy()
    diff = float(np.abs(ours - expected).max())
    print("max abs diff vs HF at 48 px:", diff)
    assert diff < 1e-4 and np.abs(expected).max() > 1e-2
    original = FAMILY.load_model(converted)
    np.testing.assert_array_equal(model.vision.pos_embed.weight.numpy()[0], original.vision.pos_embed.weight.numpy()[0])
    np.testing.assert_array_equal(model.itm_head.weight.numpy(), original.itm_head.weight.numpy())
    with pytest.raises(ValueError, match="48x48"):
        model.itm_logits(paddle.to_tensor(HF_INPUT_IDS), paddle.to_tensor(HF_MASK), _pixels(2, 32))


def test_image_size_is_validated(tiny, tmp_path):
    model, _ = tiny
    assert FAMILY.with_image_size(model, 32) is model
    for bad in (36, 0, True, 40.0):
        with pytest.raises(ConfigError, match="multiple of the patch size"):
            FAMILY.with_image_size(model, bad)
    from vlretrieval.models.registry import get_family

    with pytest.raises(ConfigError, match="ernie_vil cannot change the image resolution"):
        get_family("ernie_vil").with_image_size(object(), 384)


def test_converted_tokenizer_is_roberta(converted):
    tokenizer = FAMILY.load_tokenizer(converted)
    assert type(tokenizer).__name__ == "RobertaBPETokenizer"
    encoded = FAMILY.tokenize(tokenizer, ["a b", "a"], max_len=8)
    assert encoded["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(encoded["input_ids"], [[0, 5, 8, 2], [0, 5, 2, 1]])
    np.testing.assert_array_equal(encoded["attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])


def test_missing_heads_are_fresh_and_reported(hf_checkpoints, tmp_path, capsys):
    root, _, _, _ = hf_checkpoints
    assert main(["convert", "--checkpoint", str(root / "itm"), "--out", str(tmp_path / "itm_only")]) == 0
    assert "itc_text_head.weight" in capsys.readouterr().out
    fresh = read_model_info(tmp_path / "itm_only")["conversion"]["fresh"]
    assert {"log_logit_scale", "itc_text_head.weight", "itc_image_head.bias", "itc_cross_modal_head.weight"} <= set(fresh)
    assert not any(name.startswith("itm_head") for name in fresh)


def test_converter_names_unknown_and_misshapen_keys(hf_checkpoints, tmp_path):
    torch = pytest.importorskip("torch")
    root, config, _, _ = hf_checkpoints
    from safetensors.numpy import load_file

    state = dict(load_file(str(root / "itc" / "model.safetensors")))
    model = BridgeTowerForRetrieval(config_from_hf(config.to_dict()))
    report = ConversionReport(sources=[])
    convert_state_dict(state, model, report)
    assert "itm_head.weight" in report.fresh

    with pytest.raises(ConversionError, match=r"bridgetower\.cross_modal_text_bogus\.weight"):
        convert_state_dict({**state, "bridgetower.cross_modal_text_bogus.weight": np.zeros(3, np.float32)}, model)
    key = "bridgetower.cross_modal_text_transform.weight"
    with pytest.raises(ConversionError, match=rf"{key}.*\[128, 127\].*\[128, 128\]"):
        convert_state_dict({**state, key: np.zeros((128, 127), np.float32)}, model)
    # The same checks apply to a bare state-dict file, whose config is passed separately.
    bad = {name: torch.from_numpy(value.copy()) for name, value in state.items()}
    bad["bridgetower.cross_modal_image_pooler.dense.bias"] = torch.zeros(7)
    torch.save(bad, tmp_path / "state.bin")
    with pytest.raises(ConversionError, match=r"cross_modal_image_pooler\.dense\.bias.*\[7\]"):
        convert_bridgetower_checkpoint(tmp_path / "state.bin", tmp_path / "out", config=config.to_dict())
    with pytest.raises(ConversionError, match="no config.json"):
        convert_bridgetower_checkpoint(tmp_path / "state.bin", tmp_path / "out")


# -- tiny models ------------------------------------------------------------------------------------


def test_tiny_is_deterministic_per_seed_and_validated(vocab_file):
    first, tokenizer = FAMILY.build_tiny(vocab_file, seed=0)
    again, _ = FAMILY.build_tiny(vocab_file, seed=0)
    other, _ = FAMILY.build_tiny(vocab_file, seed=1)
    state, again_state, other_state = first.state_dict(), again.state_dict(), other.state_dict()
    for name, value in state.items():
        np.testing.assert_array_equal(value.numpy(), again_state[name].numpy(), err_msg=name)
    assert not np.array_equal(state["vision.patch_embed.weight"].numpy(), other_state["vision.patch_embed.weight"].numpy())
    assert first.config.text_config.pad_token_id == tokenizer.pad_token_id == 0
    assert first.config.contrastive_hidden_size == ITC_DIM and first.itc_cross_modal_head.weight.shape == [128, ITC_DIM]
    assert FAMILY.kind == CROSS_ENCODER and FAMILY.train_max_len == FAMILY.eval_max_len == 40
    with pytest.raises(ConfigError, match="unknown bridgetower tiny"):
        FAMILY.build_tiny(vocab_file, width=3)
    with pytest.raises(ConfigError, match="64 \\* vision_heads"):
        FAMILY.build_tiny(vocab_file, vision_hidden_size=96)


def test_padding_does_not_change_scores(tiny):
    model, tokenizer = tiny
    pixels = _pixels(1, 32)
    alone = FAMILY.tokenize(tokenizer, CAPTIONS[:1], max_len=40)
    batch = FAMILY.tokenize(tokenizer, CAPTIONS[:2], max_len=40, pad_to_max=True)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]
    with paddle.no_grad():
        single = model.itm_logits(paddle.to_tensor(alone["input_ids"]), paddle.to_tensor(alone["attention_mask"]), pixels)
        padded = model.itm_logits(
            paddle.to_tensor(batch["input_ids"]), paddle.to_tensor(batch["attention_mask"]), pixels.expand([2, 3, 32, 32])
        )
        # Encoding once and pairing one image with every text gives the same logits.
        ids, mask = paddle.to_tensor(batch["input_ids"]), paddle.to_tensor(batch["attention_mask"])
        paired = model.itm_logits_from_states(model.encode_texts_unimodal(ids, mask), mask, model.encode_images_unimodal(pixels))
        scores = model.score_pairs(input_ids=ids, attention_mask=mask, pixel_values=pixels.expand([2, 3, 32, 32]))
    np.testing.assert_allclose(padded.numpy()[0], single.numpy()[0], atol=1e-5)
    np.testing.assert_allclose(paired.numpy(), padded.numpy(), atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), padded.numpy()[:, 1] - padded.numpy()[:, 0], atol=1e-6)


def test_save_load_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    out = FAMILY.save_atomic(model, tokenizer, tmp_path / "tiny", extra_info={"init": "tiny"})
    loaded, loaded_tokenizer = FAMILY.load_model(out), FAMILY.load_tokenizer(out)
    enc = FAMILY.tokenize(loaded_tokenizer, CAPTIONS, max_len=40)
    ids, mask = paddle.to_tensor(enc["input_ids"]), paddle.to_tensor(enc["attention_mask"])
    pixels = _pixels(3, 32, seed=2)
    with paddle.no_grad():
        np.testing.assert_array_equal(model.itm_logits(ids, mask, pixels).numpy(), loaded.itm_logits(ids, mask, pixels).numpy())
        text_a, text_b = model.encode_texts_unimodal(ids, mask), loaded.encode_texts_unimodal(ids, mask)
        np.testing.assert_array_equal(model.itc_text_features(text_a, mask).numpy(), loaded.itc_text_features(text_b, mask).numpy())
        features = loaded.itc_image_features(loaded.encode_images_unimodal(pixels)).numpy()
        np.testing.assert_array_equal(model.itc_image_features(model.encode_images_unimodal(pixels)).numpy(), features)
    assert features.shape == (3, ITC_DIM)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    info = read_model_info(out)
    assert info["family"] == "bridgetower" and info["init"] == "tiny"
    assert info["image_size"] == 32 and info["itc_dim"] == ITC_DIM and info["tokenizer_class"] == "BertTokenizer"
    assert info["max_text_len"] == 63 and info["train_max_len"] == info["eval_max_len"] == 40
    assert FAMILY.image_transform(loaded, train=False).mean == CLIP_MEAN

    labels = paddle.to_tensor([1, 0, 0])
    loss = loaded.itm_loss(labels, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    logits = loaded.itm_logits(ids, mask, pixels).numpy()
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert float(loss) == pytest.approx(-np.mean(log_probs[[0, 1, 2], [1, 0, 0]]), rel=1e-5)


def test_clamp_logit_scale(tiny):
    model, _ = tiny
    assert model.logit_scale().item() == pytest.approx(math.exp(2.6592), rel=1e-6)
    saved = model.log_logit_scale.numpy().copy()
    try:
        model.log_logit_scale.set_value(paddle.to_tensor([9.0]))
        model.clamp_logit_scale_()
        assert model.logit_scale().item() == pytest.approx(100.0, rel=1e-5)
        assert model.no_weight_decay_names() == {"log_logit_scale"}
    finally:
        model.log_logit_scale.set_value(paddle.to_tensor(saved))
