"""The Chinese-CLIP family: its classes, CLIP's pixel statistics, the reference's text handling and
what its saved directories record.

Images are normalised with CLIP's mean and std, not ImageNet's; evaluation resizes the whole image
to a square (bicubic), training uses RandomResizedCrop with scale 0.9-1.0.
"""

from __future__ import annotations

from typing import Any

from paddlenlp.transformers import ChineseCLIPImageProcessor, ChineseCLIPTokenizer

from ..base import CLIP_MEAN, CLIP_STD, ModelFamily
from ..registry import register_family
from .configuration import PRETRAINED_NAME, PRETRAINED_NAMES, TINY_ARCHITECTURE, published_config, tiny_config
from .modeling import ChineseCLIPDualEncoder

# The reference pipeline (cn_clip's text preprocessing) maps curly double quotes to ASCII before
# tokenizing, for training and evaluation alike, so the pretrained weights only ever saw '"'.
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"'})


class ChineseCLIPFamily(ModelFamily):
    """Loading, saving, tokenization and preprocessing of Chinese-CLIP."""

    model_class = ChineseCLIPDualEncoder
    tokenizer_class = ChineseCLIPTokenizer
    image_processor_class = ChineseCLIPImageProcessor
    image_mean = CLIP_MEAN
    image_std = CLIP_STD
    known_pretrained_names = PRETRAINED_NAMES

    def tiny_config(self, tokenizer: Any, **overrides: Any):
        return tiny_config(tokenizer.vocab_size, **overrides)

    def published_config(self, tokenizer: Any):
        return published_config(tokenizer.vocab_size)

    def model_info(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        return {**super().model_info(model, tokenizer), "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}

    def normalise_text(self, text: str) -> str:
        return str(text).translate(_QUOTES)


FAMILY = register_family(
    ChineseCLIPFamily(
        name="chinese_clip",
        description="Chinese-CLIP (CLIP ViT-B/16 + Chinese RoBERTa-wwm base, projected to 512-d)",
        default_pretrained=PRETRAINED_NAME,
        supports_recompute=True,
        # The reference fine-tunes and evaluates with a context length of 52 tokens.
        train_max_len=52,
        eval_max_len=52,
        tiny=dict(TINY_ARCHITECTURE),
    )
)
