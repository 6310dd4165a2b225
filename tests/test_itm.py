"""ITM training pairs over detector regions: positives, swapped negatives, and their assembly."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from vlretrieval.data.lmdb_store import SplitStore
from vlretrieval.data.regions import FEATURE_DIM, RegionStore
from vlretrieval.errors import ConfigError
from vlretrieval.models.vinvl.data import RegionPairCollator, RegionPairDataset

from .conftest import serialized_region_split


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A serialized English demo split of 40 images with its region store, and a tiny VinVL tokenizer."""
    from vlretrieval.models.registry import get_family

    root = tmp_path_factory.mktemp("itm")
    serialized_region_split(root, "demo_itm", seed=7, images=40)
    with SplitStore(root / "lmdb") as store:
        texts = store.texts()
    _, tokenizer = get_family("vinvl").build_tiny(root / "vocab.txt")
    return root, texts, tokenizer


def test_items_pair_a_positive_with_a_true_negative(split):
    root, texts, tokenizer = split
    dataset = RegionPairDataset(root / "lmdb", root / "regions", "vinvl", tokenizer)
    gold = {t.text: set(t.image_ids) for t in texts}
    store = RegionStore(root / "regions")
    swapped_captions = 0
    random.seed(0)
    for index in range(len(dataset)):
        positive, negative = dataset[index]["examples"]
        assert (positive["label"], negative["label"]) == (1, 0)
        image_id, caption_position = dataset._pairs[index]
        assert positive["regions"].shape == (len(store.tags(image_id)), FEATURE_DIM)
        np.testing.assert_array_equal(positive["regions"], store.features(image_id))
        caption, tags = tokenizer.convert_ids_to_tokens(positive["caption_ids"].tolist()), positive["tag_ids"]
        words = re.findall(r"\w+", texts[caption_position].text.lower())
        assert re.findall(r"\w+", tokenizer.convert_tokens_to_string(caption)) == words
        assert tokenizer.convert_ids_to_tokens(tags.tolist()) == " ".join(store.tags(image_id)).split()
        # Exactly one side swapped, to a pair that is not gold.
        caption_changed = not np.array_equal(negative["caption_ids"], positive["caption_ids"])
        image_changed = not np.array_equal(negative["regions"], positive["regions"])
        assert caption_changed != image_changed
        swapped_captions += caption_changed
    assert 0.3 < swapped_captions / len(dataset) < 0.7  # p = 0.5 over 200 items


def test_negatives_never_match_and_candidates_come_in_groups(split):
    root, _, tokenizer = split
    dataset = RegionPairDataset(root / "lmdb", root / "regions", "vinvl", tokenizer, negative_candidates=4)
    rng = random.Random(1)
    for index in range(len(dataset)):
        image_id, caption_position = dataset._pairs[index]
        for _ in range(5):
            neg_caption, neg_image = dataset.negative_for(image_id, caption_position, rng)
            assert neg_image not in dataset._gold_images[neg_caption]
            assert (neg_caption == caption_position) != (neg_image == image_id)
    batch = RegionPairCollator("vinvl", tokenizer, max_len=32, max_regions=4)([dataset[0], dataset[1]])
    assert batch["labels"].tolist() == [1, 0, 0, 0, 0] * 2
    assert batch["negative_candidates"].tolist() == [4]
    with pytest.raises(ValueError, match="negative_candidates"):
        RegionPairDataset(root / "lmdb", root / "regions", "vinvl", tokenizer, negative_candidates=0)


def test_the_model_trains_on_the_negative_it_scores_highest(split):
    import paddle

    from vlretrieval.models.registry import get_family

    root, _, tokenizer = split
    family = get_family("vinvl")
    model, _ = family.build_tiny(root / "vocab.txt", seed=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dataset = RegionPairDataset(root / "lmdb", root / "regions", "vinvl", tokenizer, negative_candidates=3)
    random.seed(2)
    batch = RegionPairCollator("vinvl", tokenizer, max_len=32, max_regions=4)([dataset[i] for i in range(4)])
    tensors = {key: paddle.to_tensor(value) for key, value in batch.items() if key != "labels"}
    with paddle.no_grad():
        output = model(**tensors)
        plain = {key: value for key, value in tensors.items() if key != "negative_candidates"}
        scores = model.score_pairs(**plain).numpy().reshape(4, 4)  # rows: positive, then 3 candidates
    assert output.labels.numpy().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    log_odds = (output.logits[:, 1] - output.logits[:, 0]).numpy()
    np.testing.assert_allclose(log_odds[:4], scores[:, 0], atol=1e-5)
    np.testing.assert_allclose(log_odds[4:], scores[:, 1:].max(axis=1), atol=1e-5)


def test_collator_flattens_items_into_labelled_pairs(split):
    root, _, tokenizer = split
    dataset = RegionPairDataset(root / "lmdb", root / "regions", "vinvl", tokenizer)
    batch = RegionPairCollator("vinvl", tokenizer, max_len=24, max_regions=2)([dataset[0], dataset[1], dataset[2]])
    assert batch["labels"].tolist() == [1, 0, 1, 0, 1, 0]
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].shape[1] <= 24
    assert batch["region_features"].shape[1:] == (2, FEATURE_DIM)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "region_features", "region_mask", "labels"}


def test_vinvl_needs_the_region_store(split):
    from vlretrieval.models.registry import get_family

    root, _, tokenizer = split
    with pytest.raises(ConfigError, match="region store"):
        get_family("vinvl").training_dataset(None, tokenizer, root / "lmdb", max_len=32,
                                             hparams={"itm_negative_candidates": 1}, regions=None)
