"""Masked-token pretraining of an initial model on its training split (Oscar's objective for VinVL)."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from vlretrieval.errors import ConfigError
from vlretrieval.models.base import MODEL_INFO_FILE
from vlretrieval.models.prepare import prepare_initial_model
from vlretrieval.models.registry import get_family
from vlretrieval.models.vinvl.pretraining import IGNORE_INDEX, mask_tokens, masked_token_pretraining, resolve_pretrain_settings

from .conftest import serialized_region_split

paddle.set_device("cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A serialized English demo split of 24 images with its region store and its captions' vocabulary."""
    root = tmp_path_factory.mktemp("pretrain")
    return root, serialized_region_split(root, "demo_pt", seed=11, images=24)


def test_masking_follows_the_bert_rule():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, size=(400, 50))
    maskable = np.ones_like(ids, dtype=bool)
    maskable[:, 0] = maskable[:, -5:] = False  # [CLS], [SEP] and padding
    inputs, labels = mask_tokens(ids, maskable, mask_id=3, vocab_size=1000, probability=0.15, rng=rng)
    chosen = labels != IGNORE_INDEX
    assert not chosen[~maskable].any() and (inputs[~maskable] == ids[~maskable]).all()
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    masked = (inputs == 3) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
    assert 0.08 < kept.sum() / chosen.sum() < 0.13  # 10 % kept, plus random draws of the same id
    assert (inputs[~chosen] == ids[~chosen]).all()

    one_row = np.array([[2, 40, 41, 3]])
    only_middle = np.array([[False, True, True, False]])
    _, labels = mask_tokens(one_row, only_middle, mask_id=4, vocab_size=50, probability=1e-9, rng=rng)
    assert (labels != IGNORE_INDEX).sum() == 1 and (labels[~only_middle] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="no maskable token"):
        mask_tokens(one_row, np.zeros_like(only_middle), mask_id=4, vocab_size=50, probability=0.15, rng=rng)


def test_settings_are_validated():
    assert resolve_pretrain_settings({"steps": 10})["batch_size"] == 64
    with pytest.raises(ConfigError, match="unknown pretrain"):
        resolve_pretrain_settings({"steps": 10, "epochs": 2})
    for bad in ({}, {"steps": 0}, {"steps": True}, {"steps": 5, "mask_probability": 1.5},
                {"steps": 5, "learning_rate": 0}, {"steps": 5, "weight_decay": -1}, {"steps": 5, "max_len": 2}):
        with pytest.raises(ConfigError, match="pretrain"):
            resolve_pretrain_settings(bad)


def test_pretraining_learns_masked_words_and_leaves_the_matching_head(split):
    root, _ = split
    family = get_family("vinvl")
    model, tokenizer = family.build_tiny(root / "vocab.txt", seed=0)
    before = {name: p.numpy().copy() for name, p in model.named_parameters()}
    info = masked_token_pretraining("vinvl", model, tokenizer, root / "lmdb", root / "regions",
                                    {"steps": 150, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 10,
                                     "max_len": 64})
    assert info["examples"] == 150 * 16 and info["max_len"] == 64
    # From ln(vocabulary) at the start; 150 small steps already take a fifth off (measured 3.60 -> 2.81).
    assert info["loss_last"] < 0.85 * info["loss_first"], info
    assert info["masked_accuracy_last"] > 0.15, info
    after = dict(model.named_parameters())
    for name, value in before.items():
        moved = not np.array_equal(after[name].numpy(), value)
        if name.startswith(("classifier.", "pooler.")):
            assert not moved, name  # the matching head is not part of the objective
        elif name.startswith(("embeddings.word_embeddings", "encoder.layers.0.self_attn", "img_embedding")):
            assert moved, name
    assert not model.training


def test_prepare_initial_model_pretrains_and_records_it(split, tmp_path):
    root, texts = split
    out = prepare_initial_model("vinvl", "tiny", tmp_path / "init", vocab_texts=texts,
                                pretrain={"steps": 3, "batch_size": 4}, train_data=root / "lmdb",
                                regions=root / "regions")
    info = json.loads((out / MODEL_INFO_FILE).read_text())
    assert info["init"] == "tiny" and info["pretrain"]["settings"]["steps"] == 3
    assert info["pretrain"]["examples"] == 12
    get_family("vinvl").load_model(out)
    # A batch larger than the split's 120 pairs draws from several passes over it.
    larger = prepare_initial_model("vinvl", "tiny", tmp_path / "large_batch", vocab_texts=texts,
                                   pretrain={"steps": 1, "batch_size": 300}, train_data=root / "lmdb",
                                   regions=root / "regions")
    assert json.loads((larger / MODEL_INFO_FILE).read_text())["pretrain"]["examples"] == 300

    with pytest.raises(ConfigError, match="region store"):
        prepare_initial_model("vinvl", "tiny", tmp_path / "no_regions", vocab_texts=texts,
                              pretrain={"steps": 3}, train_data=root / "lmdb")
    with pytest.raises(ConfigError, match="no pretraining objective"):
        prepare_initial_model("ernie_vil", "tiny", tmp_path / "dual", vocab_texts=texts,
                              pretrain={"steps": 3}, train_data=root / "lmdb")
    assert not (tmp_path / "no_regions").exists() and not (tmp_path / "dual").exists()
