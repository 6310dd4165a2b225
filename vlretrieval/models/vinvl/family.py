"""The VinVL (Oscar+) family: its classes, input assembly from captions, tags and regions, and its
training data, pretraining and pair scoring hooks.

``max_regions`` is the default number of regions kept per image; a converted torch checkpoint loads
like any saved directory (:mod:`vlretrieval.models.vinvl.convert`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from paddlenlp.transformers import BertTokenizer

from ...errors import ConfigError
from ..base import ModelFamily
from ..registry import register_family
from .configuration import (
    DEFAULT_MAX_LEN,
    DEFAULT_MAX_REGIONS,
    FEATURE_DIM,
    TINY_ARCHITECTURE,
    OscarConfig,
    published_config,
    tiny_config,
)
from .data import RegionPairCollator, RegionPairDataset
from .modeling import OscarForImageTextMatching
from .pretraining import masked_token_pretraining
from .scoring import RegionPairScorer

FAMILY_NAME = "vinvl"


def _as_ids(values: Any, where: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{where}: token ids must be one-dimensional, got shape {array.shape}")
    return array


@dataclass
class VinVLFamily(ModelFamily):
    """Loading, saving and input assembly of the Oscar/VinVL cross-encoder.

    ``max_regions`` is the default number of regions kept per image (the first ones, in the order the
    detector listed them); ``train_max_len`` / ``eval_max_len`` count caption, tags and the three
    special tokens together.
    """

    max_regions: int = DEFAULT_MAX_REGIONS
    feature_dim: int = FEATURE_DIM

    model_class = OscarForImageTextMatching
    tokenizer_class = BertTokenizer

    def tiny_config(self, tokenizer: Any, **overrides: Any) -> OscarConfig:
        return tiny_config(tokenizer.vocab_size, **overrides)

    def published_config(self, tokenizer: Any) -> OscarConfig:
        return published_config(tokenizer.vocab_size)

    def model_info(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        max_text_len = int(model.config.max_position_embeddings)
        return {
            "max_text_len": max_text_len,
            "train_max_len": min(self.train_max_len, max_text_len),
            "eval_max_len": min(self.eval_max_len, max_text_len),
            "max_regions": int(self.max_regions),
            "feature_dim": int(model.config.img_feature_dim),
            "vocab_size": int(model.config.vocab_size),
            "use_img_layernorm": bool(model.config.use_img_layernorm),
        }

    # -- training and ranking data ------------------------------------------------------------------

    def training_dataset(self, model: Any, tokenizer: Any, train_data: str | os.PathLike, *, max_len: int,
                         hparams: dict[str, Any], regions: str | os.PathLike | None = None) -> RegionPairDataset:
        """Binary ITM: each positive pair with one negative, its caption or its image swapped."""
        if regions is None:
            raise ConfigError(f"{self.name} trains on detector regions: give the region store of {train_data}")
        return RegionPairDataset(train_data, regions, self.name, tokenizer,
                                 negative_candidates=hparams["itm_negative_candidates"])

    def training_collator(self, tokenizer: Any, model: Any, *, max_len: int) -> RegionPairCollator:
        return RegionPairCollator(self.name, tokenizer, max_len=max_len, max_regions=self.max_regions)

    def pretrain(self, model: Any, tokenizer: Any, train_data: str | os.PathLike, *,
                 settings: Mapping[str, Any], regions: str | os.PathLike | None = None) -> dict[str, Any]:
        """Oscar's masked-token pretraining over caption and tags, given the regions
        (:func:`~vlretrieval.models.vinvl.pretraining.masked_token_pretraining`)."""
        if regions is None:
            raise ConfigError(f"{self.name} pretrains on detector regions: give the region store of {train_data}")
        return masked_token_pretraining(self.name, model, tokenizer, train_data, regions, settings)

    def pair_scorer(self, model_dir: str | os.PathLike, split_dir: str | os.PathLike, *,
                    regions: str | os.PathLike | None = None, batch_size: int = 256,
                    max_len: int | None = None) -> RegionPairScorer:
        if regions is None:
            raise ConfigError(f"{self.name} scores pairs from detector regions: give the region store of {split_dir}")
        return RegionPairScorer(model_dir, split_dir, regions, batch_size=batch_size, max_len=max_len)

    # -- inputs -------------------------------------------------------------------------------------

    def image_size(self, model: Any) -> int:
        """Not defined: the model reads detector region features, not pixels."""
        raise ConfigError(
            f"the {self.name} family reads {FEATURE_DIM}-d region features from a detector, not pixels; "
            "it has no image size or pixel transform"
        )

    def image_transform(self, model_or_size: Any, *, train: bool, hflip: bool = True):
        raise ConfigError(f"the {self.name} family reads region features, not pixels; it has no image transform")

    def text_pieces(self, tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
        """WordPiece ids of each text without special tokens, so captions and tags are tokenized once."""
        return [
            np.asarray(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)), dtype=np.int64).reshape(-1)
            for text in texts
        ]

    def assemble_pairs(
        self,
        tokenizer: Any,
        caption_ids: Sequence[np.ndarray],
        tag_ids: Sequence[np.ndarray],
        regions: Sequence[np.ndarray],
        *,
        max_len: int | None = None,
        max_regions: int | None = None,
        feature_dim: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Model inputs of ``n`` aligned (caption, tags, regions) triples, padded to the longest in the batch.

        Truncation as in Oscar's ``tensorize_example``: the caption keeps up to ``max_len - 2`` pieces;
        the tags get what is left after ``[CLS] caption [SEP]`` and their own ``[SEP]``. A pair with no
        tags has no second segment. Oscar slices the tags with a negative bound when the caption fills
        the whole budget, which overruns ``max_len``; here the tag segment is dropped instead.

        Regions keep their first ``max_regions`` rows; an image without regions gets one masked zero
        row, so every batch has at least one region column.
        """
        max_len = int(self.eval_max_len if max_len is None else max_len)
        max_regions = int(self.max_regions if max_regions is None else max_regions)
        feature_dim = int(self.feature_dim if feature_dim is None else feature_dim)
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        if max_regions < 0:
            raise ValueError(f"max_regions must be >= 0, got {max_regions}")
        n = len(caption_ids)
        if len(tag_ids) != n or len(regions) != n:
            raise ValueError(
                f"caption_ids, tag_ids and regions must be aligned; got {n}, {len(tag_ids)} and {len(regions)}"
            )
        cls_id, sep_id, pad_id = int(tokenizer.cls_token_id), int(tokenizer.sep_token_id), int(tokenizer.pad_token_id)

        sequences, segments = [], []
        for i in range(n):
            caption = _as_ids(caption_ids[i], f"pair {i} caption")[: max_len - 2]
            tags = _as_ids(tag_ids[i], f"pair {i} tags")
            ids = [cls_id, *caption.tolist(), sep_id]
            seg = [0] * len(ids)
            room = max_len - len(ids) - 1
            if tags.size and room >= 0:
                kept = tags[:room].tolist()
                ids += kept + [sep_id]
                seg += [1] * (len(kept) + 1)
            sequences.append(ids)
            segments.append(seg)

        kept_regions = []
        for i in range(n):
            array = np.asarray(regions[i], dtype=np.float32)
            if array.ndim != 2 or array.shape[1] != feature_dim:
                raise ValueError(
                    f"pair {i}: region features must be [num_regions, {feature_dim}], got shape {array.shape}"
                )
            kept_regions.append(array[:max_regions])

        length = max((len(s) for s in sequences), default=2)
        n_regions = max([1] + [len(r) for r in kept_regions])
        input_ids = np.full((n, length), pad_id, dtype=np.int64)
        token_type_ids = np.zeros((n, length), dtype=np.int64)
        attention_mask = np.zeros((n, length), dtype=np.int64)
        region_features = np.zeros((n, n_regions, feature_dim), dtype=np.float32)
        region_mask = np.zeros((n, n_regions), dtype=np.int64)
        for i, (ids, seg, reg) in enumerate(zip(sequences, segments, kept_regions)):
            input_ids[i, : len(ids)] = ids
            token_type_ids[i, : len(seg)] = seg
            attention_mask[i, : len(ids)] = 1
            region_features[i, : len(reg)] = reg
            region_mask[i, : len(reg)] = 1
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "region_features": region_features,
            "region_mask": region_mask,
        }


FAMILY = register_family(
    VinVLFamily(
        name=FAMILY_NAME,
        description="VinVL (Oscar+) cross-encoder: BERT over caption, detector tags and 2054-d region features",
        default_pretrained=None,
        supports_recompute=False,
        train_max_len=DEFAULT_MAX_LEN,
        eval_max_len=DEFAULT_MAX_LEN,
        tiny=dict(TINY_ARCHITECTURE),
        max_regions=DEFAULT_MAX_REGIONS,
    )
)
