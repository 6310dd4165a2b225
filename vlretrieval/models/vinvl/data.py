"""Image-text matching (ITM) training data for cross encoders over detector regions (VinVL/Oscar+).

Every item of :class:`RegionPairDataset` is one positive pair of the split together with one negative
made from it, as in the Oscar retrieval recipe: with probability ``swap_probability`` the caption is
replaced by a caption of another image, otherwise the image is replaced by another image. A swap
never lands on a gold match (a caption that also describes the image, or an image the caption also
describes), so a label 0 is always a true non-match. :class:`RegionPairCollator` flattens the items
into a batch of ``2n`` pairs with ``labels`` ``[1, 0, 1, 0, ...]`` and assembles them through the
family (``family.assemble_pairs``), so training and evaluation build their inputs the same way.

With ``negative_candidates`` k > 1 an item carries k such negatives, and the model trains on the one
it currently scores highest (hard-negative mining; the batch says ``negative_candidates``). A model
trained from scratch on random negatives settles on whatever cue separates most of them (on the demo,
the number of objects); the hardest of several random negatives mostly lacks that cue.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from paddle.io import Dataset

from ...data.regions import RegionStore
from ...errors import DataError
from ..datasets import EpochSeededItems, release_store, shared_store
from ..registry import get_family


class RegionPairDataset(EpochSeededItems, Dataset):
    """Item ``i``: pair ``i`` of the split (label 1) and one sampled negative (label 0).

    Each example carries its caption and its image's tags as WordPiece ids (no specials) and the
    image's region features; the LMDB split and the region store are opened in each process on first
    use, so DataLoader workers open their own.
    """

    def __init__(self, split_dir: str | os.PathLike, regions_dir: str | os.PathLike, family_name: str,
                 tokenizer: Any, *, swap_probability: float = 0.5, negative_candidates: int = 1):
        super().__init__()
        if not 0.0 <= swap_probability <= 1.0:
            raise ValueError(f"swap_probability must be in [0, 1], got {swap_probability}")
        if negative_candidates < 1:
            raise ValueError(f"negative_candidates must be at least 1, got {negative_candidates}")
        self.negative_candidates = int(negative_candidates)
        self.split_dir = Path(split_dir)
        self.regions = RegionStore(regions_dir)
        self.family_name = family_name
        self.tokenizer = tokenizer
        self.swap_probability = float(swap_probability)
        store = shared_store(split_dir)
        try:
            texts = store.texts()
            self.image_ids = [int(i) for i in store.image_ids()]
            pair_ids = [(int(p.image_id), int(p.text_id)) for p in map(store.pair, range(store.num_pairs))]
        finally:
            release_store(split_dir)  # workers fork later and must be able to open it themselves
        self._captions = [t.text for t in texts]
        self._gold_images = [frozenset(int(i) for i in t.image_ids) for t in texts]
        text_position = {int(t.text_id): position for position, t in enumerate(texts)}
        # (image id, caption position) of every positive pair
        self._pairs = [(image_id, text_position[text_id]) for image_id, text_id in pair_ids]
        if not self._pairs:
            raise DataError(str(split_dir), "the split has no (image, text) pairs to train on")
        self.regions.require_images(self.image_ids, split_dir)
        if len(self.image_ids) < 2:
            raise DataError(str(split_dir), "ITM negatives need at least two images in the split")

    def __len__(self) -> int:
        return len(self._pairs)

    def _family(self):
        return get_family(self.family_name)

    def _example(self, caption_position: int, image_id: int, label: int) -> dict[str, Any]:
        family = self._family()
        regions = self.regions.get(image_id)
        caption_ids, tag_ids = family.text_pieces(
            self.tokenizer, [self._captions[caption_position], " ".join(regions.tags)]
        )
        return {"caption_ids": caption_ids, "tag_ids": tag_ids, "regions": regions.features, "label": label}

    def negative_for(self, image_id: int, caption_position: int, rng: random.Random) -> tuple[int, int]:
        """(caption position, image id) of a non-matching pair made from a positive by one swap: the
        caption with probability ``swap_probability``, else the image; never a gold pair."""
        if rng.random() < self.swap_probability:
            # Another caption: redraw while it describes this image too.
            for _ in range(100):
                candidate = rng.randrange(len(self._captions))
                if image_id not in self._gold_images[candidate]:
                    return candidate, image_id
        else:
            gold = self._gold_images[caption_position]
            for _ in range(100):
                candidate = self.image_ids[rng.randrange(len(self.image_ids))]
                if candidate not in gold:
                    return caption_position, candidate
        raise DataError(str(self.split_dir), f"no negative found for image {image_id} in 100 draws: "
                                             "nearly every caption matches every image")

    def positive(self, index: int) -> dict[str, Any]:
        """Pair ``index`` of the split alone (label 1): caption and tag ids and the image's regions."""
        image_id, caption_position = self._pairs[int(index)]
        return self._example(caption_position, image_id, 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, caption_position = self._pairs[int(index)]
        examples = [self.positive(index)]
        rng = self.rng_for(index)
        for _ in range(self.negative_candidates):
            negative_caption, negative_image = self.negative_for(image_id, caption_position, rng)
            examples.append(self._example(negative_caption, negative_image, 0))
        return {"examples": examples}


class RegionPairCollator:
    """Flattens :class:`RegionPairDataset` items into one batch of model inputs plus ``labels``."""

    def __init__(self, family_name: str, tokenizer: Any, *, max_len: int, max_regions: int):
        self.family_name = family_name
        self.tokenizer = tokenizer
        self.max_len = int(max_len)
        self.max_regions = int(max_regions)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        examples = [example for item in items for example in item["examples"]]
        batch = get_family(self.family_name).assemble_pairs(
            self.tokenizer,
            [e["caption_ids"] for e in examples],
            [e["tag_ids"] for e in examples],
            [e["regions"] for e in examples],
            max_len=self.max_len,
            max_regions=self.max_regions,
        )
        batch["labels"] = np.asarray([e["label"] for e in examples], dtype=np.int64)
        negatives = {len(item["examples"]) - 1 for item in items}
        if negatives != {1}:
            if len(negatives) != 1:
                raise ValueError(f"items carry different numbers of negatives: {sorted(negatives)}")
            # Several candidates per positive: the model keeps the one it scores highest (forward).
            batch["negative_candidates"] = np.asarray([negatives.pop()], dtype=np.int64)
        return batch
