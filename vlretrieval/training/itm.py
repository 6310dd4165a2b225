"""Image-text matching (ITM) training data for cross encoders over detector regions (VinVL/Oscar+).

Every item of :class:`RegionPairDataset` is one positive pair of the split together with one negative
made from it, as in the Oscar retrieval recipe: with probability ``swap_probability`` the caption is
replaced by a caption of another image, otherwise the image is replaced by another image. A swap
never lands on a gold match (a caption that also describes the image, or an image the caption also
describes), so a label 0 is always a true non-match. :class:`RegionPairCollator` flattens the items
into a batch of ``2n`` pairs with ``labels`` ``[1, 0, 1, 0, ...]`` and assembles them through the
family (``family.assemble_pairs``), so training and evaluation build their inputs the same way.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from paddle.io import Dataset

from ..data.regions import RegionStore
from ..errors import DataError
from .data import release_store, shared_store


class RegionPairDataset(Dataset):
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
        missing = sorted({image_id for image_id in self.image_ids if image_id not in self.regions})
        if missing:
            raise DataError(str(regions_dir), f"{len(missing)} image(s) of {split_dir} have no regions, "
                                              f"first {missing[:5]}; rebuild the region store for this split")
        if len(self.image_ids) < 2:
            raise DataError(str(split_dir), "ITM negatives need at least two images in the split")
        # Object tags of every image, to pick among several candidate negatives the one sharing the
        # most objects with the positive (not needed for the reference's single random draw).
        self._image_tags = ({image_id: frozenset(self.regions.tags(image_id)) for image_id in self.image_ids}
                            if self.negative_candidates > 1 else {})

    def __len__(self) -> int:
        return len(self._pairs)

    def _family(self):
        from ..models.registry import get_family

        return get_family(self.family_name)

    def _example(self, caption_position: int, image_id: int, label: int) -> dict[str, Any]:
        family = self._family()
        regions = self.regions.get(image_id)
        caption_ids, tag_ids = family.text_pieces(
            self.tokenizer, [self._captions[caption_position], " ".join(regions.tags)]
        )
        return {"caption_ids": caption_ids, "tag_ids": tag_ids, "regions": regions.features, "label": label}

    def _random_negative(self, image_id: int, caption_position: int, swap_caption: bool,
                         rng: random.Random) -> tuple[int, int]:
        if swap_caption:
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

    def _shared_objects(self, image_id: int, negative: tuple[int, int], swap_caption: bool) -> int:
        tags = self._image_tags[image_id]
        if swap_caption:
            # A swapped-in caption describes the images it is gold for; compare with its first one.
            other = min(self._gold_images[negative[0]], default=None)
        else:
            other = negative[1]
        return len(tags & self._image_tags[other]) if other in self._image_tags else 0

    def negative_for(self, image_id: int, caption_position: int, rng: random.Random) -> tuple[int, int]:
        """(caption position, image id) of a non-matching pair made from a positive by one swap.

        The caption is swapped with probability ``swap_probability``, else the image. With
        ``negative_candidates`` k > 1, k such negatives are drawn and the one whose image shares the
        most object tags with the positive's is kept: a harder negative, which a from-scratch model
        needs to learn more than "most words match".
        """
        swap_caption = rng.random() < self.swap_probability
        best = self._random_negative(image_id, caption_position, swap_caption, rng)
        if self.negative_candidates == 1:
            return best
        best_shared = self._shared_objects(image_id, best, swap_caption)
        for _ in range(self.negative_candidates - 1):
            candidate = self._random_negative(image_id, caption_position, swap_caption, rng)
            shared = self._shared_objects(image_id, candidate, swap_caption)
            if shared > best_shared:
                best, best_shared = candidate, shared
        return best

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, caption_position = self._pairs[int(index)]
        # The module generator: paddle reseeds it in every DataLoader worker and the Trainer seeds it.
        negative_caption, negative_image = self.negative_for(image_id, caption_position, random)
        return {"examples": [self._example(caption_position, image_id, 1),
                             self._example(negative_caption, negative_image, 0)]}


class RegionPairCollator:
    """Flattens :class:`RegionPairDataset` items into one batch of model inputs plus ``labels``."""

    def __init__(self, family_name: str, tokenizer: Any, *, max_len: int, max_regions: int):
        self.family_name = family_name
        self.tokenizer = tokenizer
        self.max_len = int(max_len)
        self.max_regions = int(max_regions)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        from ..models.registry import get_family

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
        return batch
