"""The BridgeTower family: its classes, tokenizers, resolution changes and its training and ranking hooks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
from paddlenlp.transformers import BertTokenizer, CLIPImageProcessor, RobertaBPETokenizer

from ...errors import ConfigError
from ..base import CLIP_MEAN, CLIP_STD, MODEL_INFO_FILE, ModelFamily, load_pretrained
from ..datasets import PairCollator
from ..registry import register_family
from .configuration import TINY_ARCHITECTURE, BridgeTowerConfig, published_config, tiny_config
from .modeling import BridgeTowerForRetrieval
from .scoring import BridgeTowerPairScorer

TOKENIZER_CLASSES = {"BertTokenizer": BertTokenizer, "RobertaBPETokenizer": RobertaBPETokenizer}


#: The ViT's learned position table: the class token's row, then the patch grid row by row.
POSITION_TABLE = "vision.pos_embed.weight"


def resample_position_table(table: np.ndarray, grid: int) -> np.ndarray:
    """A ViT position table ``[1 + g*g, width]`` for a ``grid`` x ``grid`` patch grid: the class
    row unchanged, the patch grid resampled bicubically (corners not aligned), as the authors'
    ``adapt_position_encoding`` does when loading pretrained weights at a new resolution."""
    rows, width = table.shape
    side = math.isqrt(rows - 1)
    if side * side != rows - 1:
        raise ConfigError(f"position table of {rows} rows is not a class row plus a square patch grid")
    patches = paddle.to_tensor(np.ascontiguousarray(table[1:], dtype=np.float32))
    patches = patches.reshape([1, side, side, width]).transpose([0, 3, 1, 2])
    patches = F.interpolate(patches, size=[grid, grid], mode="bicubic", align_corners=False)
    patches = patches.transpose([0, 2, 3, 1]).reshape([grid * grid, width]).numpy()
    return np.concatenate([table[:1], patches.astype(table.dtype)], axis=0)


class BridgeTowerCollator:
    """Training batches: ``pixel_values``, ``input_ids``, ``attention_mask`` and ``image_ids``.

    ``image_ids`` marks which pairs share an image (positives of each other); ``text_ids`` is left
    out because the Trainer hands every batch key to ``forward``.
    """

    def __init__(self, pad_token_id: int):
        self._collate = PairCollator(pad_token_id, keep_ids=True)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        batch = self._collate(items)
        batch.pop("text_ids")
        return batch


class BridgeTowerFamily(ModelFamily):
    """Loading, saving, tokenization and preprocessing of BridgeTower cross encoders.

    ``tiny`` models tokenize with a WordPiece vocabulary built from captions; converted checkpoints
    keep their RoBERTa BPE tokenizer, and the saved model info says which one a directory holds.
    """

    model_class = BridgeTowerForRetrieval
    tokenizer_class = BertTokenizer
    image_processor_class = CLIPImageProcessor
    image_mean = CLIP_MEAN
    image_std = CLIP_STD

    def tiny_config(self, tokenizer: Any, **overrides: Any) -> BridgeTowerConfig:
        return tiny_config(tokenizer.vocab_size, tokenizer.pad_token_id, **overrides)

    def published_config(self, tokenizer: Any) -> BridgeTowerConfig:
        return published_config(tokenizer.vocab_size, tokenizer.pad_token_id)

    def load_tokenizer(self, source: str | os.PathLike):
        path = Path(os.fspath(source)).expanduser()
        name = None
        if (path / MODEL_INFO_FILE).is_file():
            name = json.loads((path / MODEL_INFO_FILE).read_text(encoding="utf-8")).get("tokenizer_class")
        if name is None:
            name = "RobertaBPETokenizer" if (path / "merges.txt").is_file() else "BertTokenizer"
        if name not in TOKENIZER_CLASSES:
            raise ConfigError(f"{source}: unknown tokenizer class {name!r}; known: {sorted(TOKENIZER_CLASSES)}")
        return load_pretrained(TOKENIZER_CLASSES[name], source, f"BridgeTower {name}")

    def model_info(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        max_text_len = model.config.max_text_len
        return {
            "image_size": self.image_size(model),
            "max_text_len": max_text_len,
            "train_max_len": min(self.train_max_len, max_text_len),
            "eval_max_len": min(self.eval_max_len, max_text_len),
            "itc_dim": int(model.config.contrastive_hidden_size),
            "vocab_size": int(model.config.text_config.vocab_size),
            "pad_token_id": int(model.config.text_config.pad_token_id),
            "tokenizer_class": type(tokenizer).__name__ if tokenizer is not None else None,
        }

    # -- training and re-ranking --------------------------------------------------------------------

    def training_dataset(self, model: Any, tokenizer: Any, train_data: str | os.PathLike, *, max_len: int,
                         hparams: dict[str, Any], regions: str | os.PathLike | None = None) -> Any:
        """One augmented (image, caption) pair per item, with its ``image_id``: negatives are drawn
        inside the model from the batch, so the dataset carries none. ``regions`` is not read."""
        return super().training_dataset(model, tokenizer, train_data, max_len=max_len, hparams=hparams)

    def training_collator(self, tokenizer: Any, model: Any, *, max_len: int) -> BridgeTowerCollator:
        return BridgeTowerCollator(tokenizer.pad_token_id)

    def pair_scorer(self, model_dir: str | os.PathLike, split_dir: str | os.PathLike, *,
                    regions: str | os.PathLike | None = None, batch_size: int = 256,
                    max_len: int | None = None) -> BridgeTowerPairScorer:
        """Scores from pixels; ``regions`` is not read."""
        return BridgeTowerPairScorer(model_dir, split_dir, batch_size=batch_size, max_len=max_len)

    def with_image_size(self, model: Any, image_size: int) -> BridgeTowerForRetrieval:
        """A copy of ``model`` for ``image_size`` px images, its ViT position table resampled
        (:func:`resample_position_table`), as the authors fine-tune at 384 px from 288 px weights."""
        vision = model.config.vision_config
        patch = int(vision.patch_size)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < patch or image_size % patch:
            raise ConfigError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size!r}")
        if image_size == int(vision.image_size):
            return model
        values = model.config.to_dict()
        values["vision_config"]["image_size"] = image_size
        state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
        state[POSITION_TABLE] = resample_position_table(state[POSITION_TABLE], image_size // patch)
        resized = BridgeTowerForRetrieval(BridgeTowerConfig(**values))
        resized.set_state_dict({name: paddle.to_tensor(value) for name, value in state.items()})
        resized.eval()
        return resized


FAMILY = register_family(
    BridgeTowerFamily(
        name="bridgetower",
        description="BridgeTower cross encoder (CLIP ViT + RoBERTa, bridged cross-modal layers; ITM + ITC heads)",
        default_pretrained=None,
        supports_recompute=False,
        train_max_len=40,
        eval_max_len=40,
        tiny=dict(TINY_ARCHITECTURE),
    )
)
