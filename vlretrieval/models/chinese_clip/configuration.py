"""Chinese-CLIP configurations: the pretrained names, the published architecture of the default one
and the ``tiny`` architecture."""

from __future__ import annotations

import math
from typing import Any

from paddlenlp.transformers import ChineseCLIPConfig
from paddlenlp.transformers.chineseclip.modeling import CHINESE_CLIP_PRETRAINED_MODEL_ARCHIVE_LIST

from ...errors import ConfigError
from ..base import checked_published_vocab, tiny_architecture, tower_configs

PRETRAINED_NAME = "OFA-Sys/chinese-clip-vit-base-patch16"
#: The Chinese-CLIP checkpoints paddlenlp resolves by name (community models on its hub).
PRETRAINED_NAMES: tuple[str, ...] = tuple(CHINESE_CLIP_PRETRAINED_MODEL_ARCHIVE_LIST)

# Same budget as the ERNIE-ViL tiny model: trains a few hundred steps on a laptop CPU in minutes and
# learns the demo's colour/shape/position captions. 64 px images with 16 px patches give 16 tokens.
TINY_ARCHITECTURE: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 16,
    "vision_hidden_size": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "vision_intermediate_size": 256,
    "text_hidden_size": 64,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate_size": 256,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "projection_dim": 64,
    # Std of the text tower's normal init. The reference's 0.02 is sized for 768-wide layers; at
    # width 64 it leaves every text layer close to the identity, and the demo recipe then learns
    # much slower (fine-tuned mean recall about 40 instead of 67).
    "initializer_range": 0.07,
    # Dropout only slowed these 2-layer towers trained from scratch on the demo: at 3 epochs,
    # 0.1 gave lower fine-tuned recall than 0 for every family (docs/results.md).
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


# The architecture of PRETRAINED_NAME: CLIP's ViT-B/16 at 224 px and Chinese RoBERTa-wwm-ext base
# (BERT-base layout, vocabulary 21128, 512 positions), both projected to 512-d. Its authors count
# 188M parameters.
PUBLISHED_VOCAB_SIZE = 21128
PUBLISHED_ARCHITECTURE: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "vision_hidden_size": 768,
    "vision_layers": 12,
    "vision_heads": 12,
    "vision_intermediate_size": 3072,
    "text_hidden_size": 768,
    "text_layers": 12,
    "text_heads": 12,
    "text_intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "projection_dim": 512,
    "initializer_range": 0.02,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}
PUBLISHED_PARAMETERS = 188_000_000


def tiny_config(vocab_size: int, **overrides: Any) -> ChineseCLIPConfig:
    """The ``tiny`` Chinese-CLIP configuration for a vocabulary of ``vocab_size`` tokens."""
    return _config(tiny_architecture("chinese_clip", TINY_ARCHITECTURE, overrides), vocab_size)


def published_config(tokenizer_vocab_size: int) -> ChineseCLIPConfig:
    """The published Chinese-CLIP ViT-B/16 configuration, for a tokenizer of ``tokenizer_vocab_size`` tokens."""
    arch = tiny_architecture("chinese_clip", PUBLISHED_ARCHITECTURE, {}, what="published")
    return _config(arch, checked_published_vocab("chinese_clip", tokenizer_vocab_size, PUBLISHED_VOCAB_SIZE))


def _config(arch: dict[str, Any], vocab_size: int) -> ChineseCLIPConfig:
    if arch["projection_dim"] < 1:
        raise ConfigError(f"projection_dim must be positive, got {arch['projection_dim']}")
    text_config, vision_config = tower_configs(
        arch, vocab_size, text_extra={"initializer_range": arch["initializer_range"]}
    )
    config = ChineseCLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=arch["projection_dim"],
        logit_scale_init_value=math.log(1 / 0.07),
    )
    # ChineseCLIPConfig pins initializer_range to 0.02 in its constructor, and the text tower's
    # init reads the top-level value, so it can only be set afterwards.
    config.initializer_range = float(arch["initializer_range"])
    return config
