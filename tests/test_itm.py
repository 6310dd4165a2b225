"""ITM training pairs over detector regions: positives, swapped negatives, and their assembly."""

from __future__ import annotations

import random
import re
import zipfile

import numpy as np
import pytest

from vlretrieval.data import regions
from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.lmdb_store import SplitStore, serialize_split
from vlretrieval.data.regions import FEATURE_DIM, RegionStore
from vlretrieval.errors import ConfigError
from vlretrieval.training.itm import RegionPairCollator, RegionPairDataset


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A serialized English demo split of 40 images with its region store, and a tiny VinVL tokenizer."""
    from vlretrieval.models.registry import get_family
    from vlretrieval.models.vocab import build_vocab_file

    root = tmp_path_factory.mktemp("itm")
    spec = DemoSpec(name="demo_itm", seed=7, sizes={"train": 40}, caption_language="en", regions=True)
    write_demo_archive(spec, root / "demo.zip")
    zipfile.ZipFile(root / "demo.zip").extractall(root / "dl")
    entry = {"format": "raw_tsv", "root": "demo_itm",
             "regions": {"features": "{split}_features.tsv", "predictions": "{split}_predictions.tsv"}}
    serialize_split("raw_tsv", root / "dl", "train", root / "lmdb", entry=entry, progress=False, workers=1)
    regions.serialize_split_regions(root / "dl", entry, "train", root / "lmdb", root / "regions")
    with SplitStore(root / "lmdb") as store:
        texts = store.texts()
    build_vocab_file([t.text for t in texts], root / "vocab.txt")
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


def test_negative_never_matches_and_more_candidates_share_more_objects(split):
    root, texts, tokenizer = split
    random_neg = RegionPairDataset(root / "lmdb", root / "regions", "vinvl", tokenizer)
    harder_neg = RegionPairDataset(root / "lmdb", root / "regions", "vinvl", tokenizer, negative_candidates=8)
    tags = {i: set(RegionStore(root / "regions").tags(i)) for i in random_neg.image_ids}
    shared = {}
    for name, dataset in (("random", random_neg), ("harder", harder_neg)):
        rng = random.Random(1)
        counts = []
        for index in range(len(dataset)):
            image_id, caption_position = dataset._pairs[index]
            for _ in range(5):
                neg_caption, neg_image = dataset.negative_for(image_id, caption_position, rng)
                assert neg_image not in dataset._gold_images[neg_caption]
                other = neg_image if neg_caption == caption_position else min(dataset._gold_images[neg_caption])
                counts.append(len(tags[image_id] & tags[other]))
        shared[name] = float(np.mean(counts))
    assert shared["harder"] > shared["random"] + 0.3, shared
    with pytest.raises(ValueError, match="negative_candidates"):
        RegionPairDataset(root / "lmdb", root / "regions", "vinvl", tokenizer, negative_candidates=0)


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
