"""VinVL (Oscar+) cross-encoder: tiny builds, pair assembly, masks, save/load, torch checkpoint conversion."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from vlretrieval.errors import ConfigError
from vlretrieval.models.base import MODEL_INFO_FILE, read_model_info
from vlretrieval.models.registry import CROSS_ENCODER
from vlretrieval.models.vinvl import (
    FAMILY,
    FAMILY_NAME,
    FEATURE_DIM,
    ITMOutput,
    OscarForImageTextMatching,
    convert_oscar_checkpoint,
    main,
)

paddle.set_device("cpu")

VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "a", "red", "circle", "blue", "dog", "cat", "on", "the", "grass",
         "sits", "big", "##s"]
ID = {token: i for i, token in enumerate(VOCAB)}
# Small but not trivial: four heads, two layers, position table shorter than the family default.
SMALL = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64,
         "max_position_embeddings": 40}


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(vocab_file):
    return FAMILY.build_tiny(vocab_file, seed=0, **SMALL)


def _regions(rng, count, dim=FEATURE_DIM):
    return (0.5 * rng.standard_normal((count, dim))).astype(np.float32)


def _tensors(batch):
    return {key: paddle.to_tensor(value) for key, value in batch.items()}


def _state(model):
    return {name: value.numpy() for name, value in model.state_dict().items()}


# -- family and construction ------------------------------------------------------------------------


def test_family_registered_with_reference_defaults():
    from vlretrieval.models.registry import _FAMILIES

    assert _FAMILIES[FAMILY_NAME] is FAMILY
    assert FAMILY.kind == CROSS_ENCODER and FAMILY.default_pretrained is None
    assert (FAMILY.train_max_len, FAMILY.eval_max_len, FAMILY.max_regions) == (70, 70, 70)
    with pytest.raises(ConfigError, match="region features"):
        FAMILY.image_size(None)


def test_build_tiny_is_seeded(vocab_file, tiny):
    model, tokenizer = tiny
    assert isinstance(model, OscarForImageTextMatching) and not model.training
    assert tokenizer.vocab_size == len(VOCAB) == model.config.vocab_size
    again, _ = FAMILY.build_tiny(vocab_file, seed=0, **SMALL)
    other, _ = FAMILY.build_tiny(vocab_file, seed=1, **SMALL)
    first, second, third = _state(model), _state(again), _state(other)
    assert first.keys() == second.keys() == third.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not np.array_equal(first["classifier.weight"], third["classifier.weight"])
    assert not np.array_equal(first["encoder.layers.0.self_attn.q_proj.weight"],
                              third["encoder.layers.0.self_attn.q_proj.weight"])
    # The default tiny architecture (hidden 128) and the paddle layout of the matching head.
    default, _ = FAMILY.build_tiny(vocab_file, seed=0)
    assert default.config.hidden_size == 128 and default.config.num_hidden_layers == 2
    assert list(default.classifier.weight.shape) == [128, 2]
    assert list(default.img_embedding.weight.shape) == [FEATURE_DIM, 128]


def test_build_tiny_rejects_bad_architecture(vocab_file):
    with pytest.raises(ConfigError, match=r"unknown vinvl tiny architecture keys \['image_size'\].*hidden_size"):
        FAMILY.build_tiny(vocab_file, image_size=64)
    with pytest.raises(ConfigError, match="divisible"):
        FAMILY.build_tiny(vocab_file, hidden_size=30, num_attention_heads=4)


# -- inputs -----------------------------------------------------------------------------------------


def test_text_pieces_and_assemble_pairs_exact(tiny):
    _, tokenizer = tiny
    captions = FAMILY.text_pieces(tokenizer, ["A red circle", "blue dog", "a big red dog sits on the grass", "the cats"])
    tags = FAMILY.text_pieces(tokenizer, ["dog cat", "", "circle", "grass"])
    assert [c.tolist() for c in captions] == [
        [ID["a"], ID["red"], ID["circle"]],
        [ID["blue"], ID["dog"]],
        [ID["a"], ID["big"], ID["red"], ID["dog"], ID["sits"], ID["on"], ID["the"], ID["grass"]],
        [ID["the"], ID["cat"], ID["##s"]],
    ]
    assert all(c.dtype == np.int64 for c in captions) and tags[1].size == 0

    rng = np.random.default_rng(0)
    regions = [_regions(rng, 2), _regions(rng, 0), _regions(rng, 5), _regions(rng, 1)]
    batch = FAMILY.assemble_pairs(tokenizer, captions, tags, regions, max_len=8, max_regions=3)
    C, S, P = ID["[CLS]"], ID["[SEP]"], ID["[PAD]"]
    assert batch["input_ids"].tolist() == [
        # caption + both tags fit exactly: 1 + 3 + 1 + 2 + 1 = 8
        [C, ID["a"], ID["red"], ID["circle"], S, ID["dog"], ID["cat"], S],
        # no tags: no second segment
        [C, ID["blue"], ID["dog"], S, P, P, P, P],
        # the caption takes max_len - 2 first; no room is left for a tag segment
        [C, ID["a"], ID["big"], ID["red"], ID["dog"], ID["sits"], ID["on"], S],
        # room for the second [SEP] only, so the tags are cut to nothing (Oscar keeps the segment)
        [C, ID["the"], ID["cat"], ID["##s"], S, ID["grass"], S, P],
    ]
    assert batch["token_type_ids"].tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4, [1] * 8, [1] * 7 + [0]]
    assert all(batch[k].dtype == np.int64 for k in ("input_ids", "token_type_ids", "attention_mask", "region_mask"))

    features, mask = batch["region_features"], batch["region_mask"]
    assert features.dtype == np.float32 and features.shape == (4, 3, FEATURE_DIM)
    assert mask.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]]
    np.testing.assert_array_equal(features[0, :2], regions[0])
    np.testing.assert_array_equal(features[2], regions[2][:3])  # the first max_regions rows
    assert not features[0, 2].any() and not features[1].any() and not features[3, 1:].any()

    # Tag truncation leaves the caption alone; a longer budget keeps more tags.
    three_tags = [np.array([ID["grass"], ID["dog"], ID["cat"]])]
    for max_len, kept in ((8, ["grass", "dog"]), (9, ["grass", "dog", "cat"]), (12, ["grass", "dog", "cat"])):
        wide = FAMILY.assemble_pairs(tokenizer, captions[3:], three_tags, regions[3:], max_len=max_len, max_regions=3)
        assert wide["input_ids"].tolist() == [[C, ID["the"], ID["cat"], ID["##s"], S, *(ID[t] for t in kept), S]]

    # A batch of images without regions still has one (masked) region column.
    empty = FAMILY.assemble_pairs(tokenizer, captions[:2], tags[:2], [_regions(rng, 0)] * 2, max_len=8)
    assert empty["region_features"].shape == (2, 1, FEATURE_DIM) and empty["region_mask"].tolist() == [[0], [0]]


def test_assemble_pairs_rejects_bad_regions(tiny):
    _, tokenizer = tiny
    caps = FAMILY.text_pieces(tokenizer, ["a dog", "a cat"])
    with pytest.raises(ValueError, match=r"pair 1: region features must be \[num_regions, 2054\], got shape \(4, 2048\)"):
        FAMILY.assemble_pairs(tokenizer, caps, [np.zeros(0, np.int64)] * 2,
                              [np.zeros((2, FEATURE_DIM)), np.zeros((4, 2048))], max_len=10, max_regions=5)
    with pytest.raises(ValueError, match="aligned"):
        FAMILY.assemble_pairs(tokenizer, caps, [np.zeros(0, np.int64)], [np.zeros((2, FEATURE_DIM))] * 2, max_len=10,
                              max_regions=5)


# -- model ------------------------------------------------------------------------------------------


def _spread(model, seed):
    """Weights far from the N(0, 0.02) start, so that masking mistakes move the scores visibly."""
    rng = np.random.default_rng(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            continue
        std = 0.02 if name.startswith("img_embedding") else 0.2
        param.set_value(rng.normal(0.0, std, param.shape).astype(np.float32))
    return model


def test_scores_do_not_depend_on_padding(vocab_file):
    model, tokenizer = FAMILY.build_tiny(vocab_file, seed=5, **SMALL)
    _spread(model, 5)
    rng = np.random.default_rng(1)
    captions = FAMILY.text_pieces(tokenizer, ["a red circle", "a big blue dog sits on the grass", "cat"])
    tags = FAMILY.text_pieces(tokenizer, ["circle", "dog grass grass", ""])
    regions = [_regions(rng, 2), _regions(rng, 7), _regions(rng, 4)]
    alone = FAMILY.assemble_pairs(tokenizer, captions[:1], tags[:1], regions[:1], max_len=30, max_regions=10)
    batch = FAMILY.assemble_pairs(tokenizer, captions, tags, regions, max_len=30, max_regions=10)
    assert alone["input_ids"].shape[1] < batch["input_ids"].shape[1]
    assert alone["region_mask"].shape[1] < batch["region_mask"].shape[1]
    with paddle.no_grad():
        single = model.score_pairs(**_tensors(alone)).numpy()
        scores = model.score_pairs(**_tensors(batch)).numpy()
        logits = model(**_tensors(batch)).logits.numpy()
    assert scores.shape == (3,) and logits.shape == (3, 2) and logits.dtype == np.float32
    np.testing.assert_allclose(single[0], scores[0], atol=1e-5)
    np.testing.assert_allclose(scores, logits[:, 1] - logits[:, 0], rtol=0, atol=1e-6)
    # The masks matter: the same pair with its padded regions unmasked scores differently.
    unmasked = dict(batch, region_mask=np.ones_like(batch["region_mask"]))
    with paddle.no_grad():
        assert abs(model.score_pairs(**_tensors(unmasked)).numpy()[0] - scores[0]) > 1e-2
    assert np.ptp(scores) > 1e-2  # the pairs are told apart, so agreement within 1e-5 means something


def test_losses_are_softmax_cross_entropy(tiny):
    model, tokenizer = tiny
    rng = np.random.default_rng(2)
    batch = FAMILY.assemble_pairs(
        tokenizer, FAMILY.text_pieces(tokenizer, ["a dog", "a cat on the grass"]),
        FAMILY.text_pieces(tokenizer, ["dog", "cat grass"]), [_regions(rng, 3), _regions(rng, 2)], max_len=20,
        max_regions=10,
    )
    labels = np.array([1, 0], dtype=np.int64)
    with paddle.no_grad():
        logits = model(**_tensors(batch)).logits.numpy().astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        expected = -log_probs[np.arange(2), labels].mean()
        itm = float(model.itm_loss(paddle.to_tensor(labels), **_tensors(batch)))
        output = model(**_tensors(batch), labels=paddle.to_tensor(labels))
        trained = float(model.training_loss(output, gather_with_grad=True))
    assert isinstance(output, ITMOutput) and output.labels is not None
    assert itm == pytest.approx(expected, abs=1e-6) and trained == pytest.approx(expected, abs=1e-6)
    assert model.no_weight_decay_names() == set()
    with pytest.raises(ValueError, match="labels"):
        model.training_loss(model(**_tensors(batch)))


def test_training_steps_reduce_the_loss(vocab_file):
    model, tokenizer = FAMILY.build_tiny(
        vocab_file, seed=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SMALL
    )
    rng = np.random.default_rng(3)
    batch = _tensors(FAMILY.assemble_pairs(
        tokenizer, FAMILY.text_pieces(tokenizer, ["a red circle", "a blue dog"]),
        FAMILY.text_pieces(tokenizer, ["circle", "dog"]), [_regions(rng, 2), _regions(rng, 3)], max_len=16, max_regions=4,
    ))
    labels = paddle.to_tensor(np.array([1, 0], dtype=np.int64))
    model.train()
    optimizer = paddle.optimizer.AdamW(learning_rate=5e-3, parameters=model.parameters())
    losses = []
    for step in range(15):
        loss = model.training_loss(model(**batch, labels=labels))
        loss.backward()
        if step == 0:  # the region projection and the text embeddings both get gradients
            assert float(paddle.abs(model.img_embedding.weight.grad).sum()) > 0
            assert float(paddle.abs(model.embeddings.word_embeddings.weight.grad).sum()) > 0
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_save_and_load_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    out = FAMILY.save_atomic(model, tokenizer, tmp_path / "model", extra_info={"note": "round trip"})
    info = read_model_info(out)
    assert info["family"] == FAMILY_NAME and info["kind"] == CROSS_ENCODER
    assert info["max_text_len"] == 40 and info["eval_max_len"] == 40 and info["train_max_len"] == 40
    assert info["max_regions"] == 70 and info["feature_dim"] == FEATURE_DIM and info["vocab_size"] == len(VOCAB)
    assert info["note"] == "round trip" and (out / MODEL_INFO_FILE).is_file()

    loaded, loaded_tokenizer = FAMILY.load_model(out), FAMILY.load_tokenizer(out)
    assert not loaded.training and loaded.config.use_img_layernorm == model.config.use_img_layernorm
    rng = np.random.default_rng(4)
    texts = ["a red circle on the grass", "blue cats"]
    batches = [
        FAMILY.assemble_pairs(tok, FAMILY.text_pieces(tok, texts), FAMILY.text_pieces(tok, ["circle", ""]),
                              [_regions(rng, 3), _regions(rng, 1)], max_len=20, max_regions=5)
        for tok in (tokenizer, loaded_tokenizer)
    ]
    np.testing.assert_array_equal(batches[0]["input_ids"], batches[1]["input_ids"])
    batches[1]["region_features"] = batches[0]["region_features"]
    with paddle.no_grad():
        before = model.score_pairs(**_tensors(batches[0])).numpy()
        after = loaded.score_pairs(**_tensors(batches[1])).numpy()
    np.testing.assert_array_equal(before, after)
    with pytest.raises(ConfigError, match="not found"):
        FAMILY.load_model(tmp_path / "absent")


# -- conversion from torch Oscar checkpoints --------------------------------------------------------

TORCH_ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "max_position_embeddings": 40, "type_vocab_size": 2}


def _torch_oscar(use_img_layernorm: bool, seed: int = 0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager", **TORCH_ARCH
    )
    bert = transformers.BertModel(config, add_pooling_layer=True)
    img_embedding = torch.nn.Linear(FEATURE_DIM, TORCH_ARCH["hidden_size"])
    img_norm = torch.nn.LayerNorm(TORCH_ARCH["hidden_size"], eps=1e-12) if use_img_layernorm else None
    classifier = torch.nn.Linear(TORCH_ARCH["hidden_size"], 2)
    modules = [bert, img_embedding, classifier] + ([img_norm] if img_norm is not None else [])
    with torch.no_grad():
        # Weights far from BERT's N(0, 0.02) start, so that a wrong mapping shows in the logits.
        for module in modules:
            for name, param in module.named_parameters():
                if "LayerNorm" in name or (module is img_norm):
                    param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param))
                else:
                    param.normal_(0.0, 0.15)
        img_embedding.weight.mul_(0.1)
    for module in modules:
        module.eval()

    state = {f"bert.{k}": v for k, v in bert.state_dict().items()}
    state.update({f"bert.img_embedding.{k}": v for k, v in img_embedding.state_dict().items()})
    if img_norm is not None:
        # Old pytorch-transformers checkpoints name LayerNorm parameters gamma/beta.
        state.update({"bert.LayerNorm.gamma": img_norm.weight.data, "bert.LayerNorm.beta": img_norm.bias.data})
    state.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})

    def reference(batch):
        with torch.no_grad():
            ids = torch.tensor(batch["input_ids"])
            text = bert.embeddings(input_ids=ids, token_type_ids=torch.tensor(batch["token_type_ids"]))
            image = img_embedding(torch.tensor(batch["region_features"]))
            if img_norm is not None:
                image = img_norm(image)
            hidden = torch.cat([text, image], dim=1)
            mask = torch.cat([torch.tensor(batch["attention_mask"]), torch.tensor(batch["region_mask"])], dim=1).float()
            extended = (1.0 - mask)[:, None, None, :] * -10000.0
            sequence = bert.encoder(hidden, attention_mask=extended)[0]
            return classifier(bert.pooler(sequence)).numpy()

    oscar_config = {
        "architectures": ["ImageBertForSequenceClassification"], "vocab_size": len(VOCAB), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "img_feature_dim": FEATURE_DIM, "img_feature_type": "frcnn",
        "img_layer_norm_eps": 1e-12, "num_labels": 2, "finetuning_task": "ir", "loss_type": "sfmx",
        **TORCH_ARCH,
    }
    if use_img_layernorm:
        oscar_config["use_img_layernorm"] = 1
    return torch, state, oscar_config, reference


def _write_checkpoint(torch, path, state, config):
    path.mkdir(parents=True)
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (path / "added_tokens.json").write_text("{}", encoding="utf-8")
    return path


@pytest.mark.parametrize("use_img_layernorm", [False, True])
def test_converted_checkpoint_matches_torch_logits(tmp_path, use_img_layernorm):
    torch, state, config, reference = _torch_oscar(use_img_layernorm)
    state = dict(state)
    state["cls.predictions.bias"] = torch.zeros(len(VOCAB))  # a pretraining head, ignored
    state["bert.embeddings.position_ids"] = torch.arange(TORCH_ARCH["max_position_embeddings"])[None]
    checkpoint = _write_checkpoint(torch, tmp_path / "oscar", state, config)
    out = convert_oscar_checkpoint(checkpoint, tmp_path / "converted")
    info = read_model_info(out)
    assert info["classifier_initialised"] is False
    assert sorted(info["ignored_keys"]) == ["bert.embeddings.position_ids", "cls.predictions.bias"]
    model, tokenizer = FAMILY.load_model(out), FAMILY.load_tokenizer(out)
    assert model.config.use_img_layernorm is use_img_layernorm
    assert (model.img_layer_norm is not None) is use_img_layernorm

    rng = np.random.default_rng(5)
    batch = FAMILY.assemble_pairs(
        tokenizer,
        FAMILY.text_pieces(tokenizer, ["a big red dog sits on the grass", "blue cats", "a circle"]),
        FAMILY.text_pieces(tokenizer, ["dog grass", "cat cat", ""]),
        [_regions(rng, 4), _regions(rng, 0), _regions(rng, 6)],
        max_len=20, max_regions=10,
    )
    assert batch["attention_mask"].min() == 0 and batch["region_mask"].min() == 0  # padding on both sides
    expected = reference(batch)
    with paddle.no_grad():
        logits = model(**_tensors(batch)).logits.numpy()
        scores = model.score_pairs(**_tensors(batch)).numpy()
    assert np.abs(expected).max() > 0.1 and np.ptp(expected[:, 1] - expected[:, 0]) > 1e-3
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores, expected[:, 1] - expected[:, 0], atol=1e-4, rtol=0)


def test_pretrained_checkpoint_without_classifier_converts(tmp_path, capsys):
    torch, state, config, _ = _torch_oscar(False, seed=1)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    state["cls.seq_relationship.weight"] = torch.zeros(3, TORCH_ARCH["hidden_size"])
    checkpoint = _write_checkpoint(torch, tmp_path / "oscar_plus", state, config)
    assert main(["convert", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "converted")]) == 0
    printed = capsys.readouterr().out
    assert "freshly initialised" in printed and "cls.seq_relationship.weight" in printed
    info = read_model_info(tmp_path / "converted")
    assert info["classifier_initialised"] is True and info["ignored_keys"] == ["cls.seq_relationship.weight"]
    model = FAMILY.load_model(tmp_path / "converted")
    # The encoder is the checkpoint's, the head a fresh one.
    np.testing.assert_allclose(model.pooler.dense.weight.numpy(), state["bert.pooler.dense.weight"].numpy().T)
    assert float(paddle.abs(model.classifier.weight).sum()) > 0


def test_bad_checkpoints_name_the_key(tmp_path):
    torch, state, config, _ = _torch_oscar(False, seed=2)

    extra = dict(state, **{"bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(2, 2)})
    with pytest.raises(ConfigError, match=r"bert\.encoder\.layer\.0\.attention\.self\.rotary\.weight \[2, 2\]"):
        convert_oscar_checkpoint(_write_checkpoint(torch, tmp_path / "extra", extra, config), tmp_path / "o1")

    wrong = dict(state, **{"bert.img_embedding.weight": torch.zeros(TORCH_ARCH["hidden_size"], 2048)})
    with pytest.raises(ConfigError, match=r"bert\.img_embedding\.weight has shape \[32, 2048\].*\[32, 2054\]"):
        convert_oscar_checkpoint(_write_checkpoint(torch, tmp_path / "wrong", wrong, config), tmp_path / "o2")

    missing = {k: v for k, v in state.items() if k != "bert.encoder.layer.1.output.dense.bias"}
    with pytest.raises(ConfigError, match=r"bert\.encoder\.layer\.1\.output\.dense\.bias"):
        convert_oscar_checkpoint(_write_checkpoint(torch, tmp_path / "missing", missing, config), tmp_path / "o3")

    # An image LayerNorm the config does not switch on is an unknown key, not silently dropped.
    normed = dict(state, **{"bert.LayerNorm.weight": torch.ones(32), "bert.LayerNorm.bias": torch.zeros(32)})
    with pytest.raises(ConfigError, match=r"bert\.LayerNorm\.bias"):
        convert_oscar_checkpoint(_write_checkpoint(torch, tmp_path / "normed", normed, config), tmp_path / "o4")

    with pytest.raises(ConfigError, match="num_labels is 3"):
        convert_oscar_checkpoint(_write_checkpoint(torch, tmp_path / "three", state, dict(config, num_labels=3)),
                                 tmp_path / "o5")
    with pytest.raises(ConfigError, match="missing pytorch_model.bin"):
        convert_oscar_checkpoint(tmp_path / "nothing", tmp_path / "o6")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
