"""Pair scoring of a VinVL model over one split: the ranking hook of the family."""

from __future__ import annotations

import os

import numpy as np
import paddle

from ...data.lmdb_store import SplitStore
from ...data.regions import RegionStore
from ...errors import ConfigError
from ..base import eval_context_length, load_model_dir
from ..registry import CROSS_ENCODER


class RegionPairScorer:
    """:class:`~vlretrieval.retrieval.rerank.PairScorer` of a cross encoder over captions, object tags
    and detector regions (VinVL).

    Captions are tokenized once; each image's tags and region features are read once, when that
    image is scored, and paired with batches of ``batch_size`` captions through the family's
    ``assemble_pairs``, the same assembly training uses.
    """

    def __init__(self, model_dir: str | os.PathLike, split_dir: str | os.PathLike, regions: str | os.PathLike, *,
                 batch_size: int, max_len: int | None = None, max_regions: int | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.family, self.model, self.tokenizer, info = load_model_dir(model_dir, kind=CROSS_ENCODER,
                                                                       purpose="pair scoring")
        self.batch_size = int(batch_size)
        self.max_len = eval_context_length(model_dir, self.family, max_len)
        self.max_regions = int(max_regions or info.get("max_regions") or self.family.max_regions)
        with SplitStore(split_dir) as store:
            texts = store.texts()
            self.image_ids = np.asarray(store.image_ids(), dtype=np.int64)
        self.text_ids = np.asarray([t.text_id for t in texts], dtype=np.int64)
        self.caption_ids = self.family.text_pieces(self.tokenizer, [t.text for t in texts])
        self.regions = RegionStore(regions)
        self.regions.require_images(self.image_ids, split_dir)

    def close(self) -> None:
        self.regions.close()

    def score(self, image_index: int, text_indices: np.ndarray) -> np.ndarray:
        regions = self.regions.get(int(self.image_ids[image_index]))
        (tag_ids,) = self.family.text_pieces(self.tokenizer, [" ".join(regions.tags)])
        out = np.empty(len(text_indices), dtype=np.float32)
        for start in range(0, len(text_indices), self.batch_size):
            chunk = text_indices[start:start + self.batch_size]
            batch = self.family.assemble_pairs(
                self.tokenizer, [self.caption_ids[t] for t in chunk], [tag_ids] * len(chunk),
                [regions.features] * len(chunk), max_len=self.max_len, max_regions=self.max_regions,
            )
            with paddle.no_grad():
                scores = self.model.score_pairs(**{key: paddle.to_tensor(value) for key, value in batch.items()})
            out[start:start + len(chunk)] = scores.numpy().astype(np.float32, copy=False)
        return out
