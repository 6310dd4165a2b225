"""ERNIE-ViL 2.0 configurations: the pretrained name, its published architecture and the ``tiny`` one."""

from __future__ import annotations

from typing import Any

from paddlenlp.transformers import ErnieViLConfig

from ...errors import ConfigError
from ..base import checked_published_vocab, tiny_architecture, tower_configs

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
    # Dropout only slowed these 2-layer towers trained from scratch on the demo: at 3 epochs,
    # 0.1 gave lower fine-tuned recall than 0 for every family (docs/results.md).
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


# The architecture of PRETRAINED_NAME: ViT-B/16 at 224 px and ERNIE 3.0 Base (12 layers, 768 wide,
# vocabulary 40000, 2048 positions, 4 token types, a task-type table of 3), no projection, so 768-d
# features. ERNIE 3.0 Base counts 118M parameters and ViT-B/16 86M.
PUBLISHED_VOCAB_SIZE = 40000
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
    "max_position_embeddings": 2048,
    "type_vocab_size": 4,
    "use_task_id": True,
    "task_type_vocab_size": 3,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}
PUBLISHED_PARAMETERS = 204_000_000  # 118M (ERNIE 3.0 Base) + 86M (ViT-B/16), as their authors count them


def _config(arch: dict[str, Any], vocab_size: int) -> ErnieViLConfig:
    if arch["vision_hidden_size"] != arch["text_hidden_size"]:
        raise ConfigError("a dual encoder without projections needs vision_hidden_size == text_hidden_size")
    task_types = {key: arch[key] for key in ("use_task_id", "task_type_vocab_size") if key in arch}
    text_config, vision_config = tower_configs(arch, vocab_size, text_extra=task_types)
    return ErnieViLConfig(text_config=text_config, vision_config=vision_config)


def tiny_config(vocab_size: int, **overrides: Any) -> ErnieViLConfig:
    """The ``tiny`` ERNIE-ViL configuration for a vocabulary of ``vocab_size`` tokens."""
    return _config(tiny_architecture("ernie_vil", TINY_ARCHITECTURE, overrides), vocab_size)


def published_config(tokenizer_vocab_size: int) -> ErnieViLConfig:
    """The published ERNIE-ViL 2.0 base configuration, for a tokenizer of ``tokenizer_vocab_size`` tokens."""
    arch = tiny_architecture("ernie_vil", PUBLISHED_ARCHITECTURE, {}, what="published")
    return _config(arch, checked_published_vocab("ernie_vil", tokenizer_vocab_size, PUBLISHED_VOCAB_SIZE))
