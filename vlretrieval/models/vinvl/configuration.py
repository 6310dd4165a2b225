"""Oscar/VinVL configuration: BERT's fields plus the region-feature ones, and the ``tiny`` architecture."""

from __future__ import annotations

from typing import Any

from paddlenlp.transformers import PretrainedConfig

from ...errors import ConfigError
from ..base import checked_published_vocab

#: Region feature width of VinVL's detector output: 2048 appearance values and 6 box values.
FEATURE_DIM = 2054
# VinVL retrieval fine-tuning: max_seq_length 70 (caption + tags) and max_img_seq_length 70.
DEFAULT_MAX_LEN = 70
DEFAULT_MAX_REGIONS = 70

TINY_ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "img_feature_dim": FEATURE_DIM,
    # A model trained from scratch sees raw detector features whose scale is arbitrary, while the
    # text embeddings are layer-normalised; normalising the projected regions too keeps both on one
    # scale from the first step.
    "use_img_layernorm": True,
}


# The architecture of VinVL (Oscar+) base: BERT-base uncased (vocabulary 30522, 512 positions;
# 110M parameters) over the text, plus the projection of 2054-d regions (1.6M) and the ITM head.
PUBLISHED_VOCAB_SIZE = 30522
PUBLISHED_ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "img_feature_dim": FEATURE_DIM,
    # VinVL's released configs normalise the projected regions (use_img_layernorm 1).
    "use_img_layernorm": True,
}
PUBLISHED_PARAMETERS = 111_600_000  # 110M (BERT-base) + 2054 x 768 + 768 (region projection)


class OscarConfig(PretrainedConfig):
    """BERT's configuration plus Oscar's region-feature fields; binary matching head only."""

    model_type = "oscar"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        img_feature_dim: int = FEATURE_DIM,
        use_img_layernorm: bool = False,
        img_layer_norm_eps: float = 1e-12,
        num_labels: int = 2,
        pool_act: str = "tanh",
        **kwargs: Any,
    ):
        super().__init__(pad_token_id=pad_token_id, num_labels=num_labels, **kwargs)
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.intermediate_size = int(intermediate_size)
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
        self.max_position_embeddings = int(max_position_embeddings)
        self.type_vocab_size = int(type_vocab_size)
        self.initializer_range = float(initializer_range)
        self.layer_norm_eps = float(layer_norm_eps)
        self.img_feature_dim = int(img_feature_dim)
        self.use_img_layernorm = bool(use_img_layernorm)
        self.img_layer_norm_eps = float(img_layer_norm_eps)
        # BertPooler reads it; Oscar's pooler is always tanh.
        self.pool_act = pool_act


def tiny_config(vocab_size: int, **overrides: Any) -> OscarConfig:
    """The ``tiny`` Oscar configuration for a vocabulary of ``vocab_size`` tokens."""
    unknown = set(overrides) - set(TINY_ARCHITECTURE)
    if unknown:
        raise ConfigError(
            f"unknown vinvl tiny architecture keys {sorted(unknown)}; known: {sorted(TINY_ARCHITECTURE)}"
        )
    return _config({**TINY_ARCHITECTURE, **overrides}, vocab_size)


def published_config(tokenizer_vocab_size: int) -> OscarConfig:
    """The published VinVL base configuration, for a tokenizer of ``tokenizer_vocab_size`` tokens."""
    return _config(dict(PUBLISHED_ARCHITECTURE), checked_published_vocab("vinvl", tokenizer_vocab_size, PUBLISHED_VOCAB_SIZE))


def _config(arch: dict[str, Any], vocab_size: int) -> OscarConfig:
    if arch["hidden_size"] % arch["num_attention_heads"]:
        raise ConfigError(
            f"hidden_size {arch['hidden_size']} must be divisible by num_attention_heads {arch['num_attention_heads']}"
        )
    return OscarConfig(vocab_size=int(vocab_size), pad_token_id=0, num_labels=2, **arch)
