"""The ERNIE-ViL 2.0 family: its classes, text lengths and what its saved directories record."""

from __future__ import annotations

from typing import Any

from paddlenlp.transformers import ErnieViLImageProcessor, ErnieViLTokenizer

from ..base import ModelFamily
from ..registry import register_family
from .configuration import PRETRAINED_NAME, TINY_ARCHITECTURE, published_config, tiny_config
from .modeling import ErnieViLDualEncoder


class ErnieViLFamily(ModelFamily):
    """Loading, saving, tokenization and preprocessing of ERNIE-ViL 2.0."""

    model_class = ErnieViLDualEncoder
    tokenizer_class = ErnieViLTokenizer
    image_processor_class = ErnieViLImageProcessor

    def tiny_config(self, tokenizer: Any, **overrides: Any):
        return tiny_config(tokenizer.vocab_size, **overrides)

    def published_config(self, tokenizer: Any):
        return published_config(tokenizer.vocab_size)


FAMILY = register_family(
    ErnieViLFamily(
        name="ernie_vil",
        description="ERNIE-ViL 2.0 (ViT-B/16 + ERNIE 3.0 Base, 768-d, no projection)",
        default_pretrained=PRETRAINED_NAME,
        supports_recompute=True,
        train_max_len=32,
        eval_max_len=52,
        tiny=dict(TINY_ARCHITECTURE),
    )
)
