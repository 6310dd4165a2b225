"""ERNIE-ViL 2.0 configurations: the pretrained name and the ``tiny`` architecture."""

from __future__ import annotations

from typing import Any

from paddlenlp.transformers import ErnieViLConfig

from ...errors import ConfigError
from ..base import tiny_architecture, tower_configs

PRETRAINED_NAME = "PaddlePaddle/ernie_vil-2.0-base-zh"

# Small enough to train a few hundred steps on a laptop CPU in minutes, big enough to learn the
# demo's colour/shape/position captions. 64 px images with 16 px patches give 16 patch tokens.
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
    "type_vocab_size": 4,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}


def tiny_config(vocab_size: int, **overrides: Any) -> ErnieViLConfig:
    """The ``tiny`` ERNIE-ViL configuration for a vocabulary of ``vocab_size`` tokens."""
    arch = tiny_architecture("ernie_vil", TINY_ARCHITECTURE, overrides)
    if arch["vision_hidden_size"] != arch["text_hidden_size"]:
        raise ConfigError("a dual encoder without projections needs vision_hidden_size == text_hidden_size")
    text_config, vision_config = tower_configs(arch, vocab_size)
    return ErnieViLConfig(text_config=text_config, vision_config=vision_config)
