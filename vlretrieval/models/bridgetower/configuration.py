"""BridgeTower configuration, named as in HF's ``BridgeTowerConfig``, and the ``tiny`` architecture."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from paddlenlp.transformers import PretrainedConfig

from ...errors import ConfigError
from ..base import checked_published_vocab, tiny_architecture

LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07)
ITC_DIM = 256

TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_channels": 3,
    "patch_size": 16,
    "image_size": 288,
    "layer_norm_eps": 1e-5,
    "initializer_factor": 1.0,
    "stop_gradient": False,
    "share_layernorm": True,
    "remove_last_layer": False,
}

TINY_ARCHITECTURE: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "vision_hidden_size": 64,
    "vision_layers": 2,
    "vision_heads": 1,  # CLIP fixes the head width at 64; kept as a key so it is validated
    "text_hidden_size": 64,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate_size": 128,
    "max_position_embeddings": 64,
    "cross_layers": 2,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "itc_dim": ITC_DIM,
    "share_link_tower_layers": False,
}


# The architecture of BridgeTower base (the checkpoints ./pretrained/bridgetower-base converts from):
# CLIP's ViT-B/16 at 288 px (86M parameters), RoBERTa-base (vocabulary 50265, 514 positions; 125M)
# and 6 cross-modal layers on each side, fed by bridge layers from the last 6 layers of both towers.
PUBLISHED_VOCAB_SIZE = 50265
PUBLISHED_ARCHITECTURE: dict[str, Any] = {
    "image_size": 288,
    "patch_size": 16,
    "vision_hidden_size": 768,
    "vision_layers": 12,
    "vision_heads": 12,
    "text_hidden_size": 768,
    "text_layers": 12,
    "text_heads": 12,
    "text_intermediate_size": 3072,
    "max_position_embeddings": 514,
    "cross_layers": 6,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "itc_dim": ITC_DIM,
    "share_link_tower_layers": False,
}
# No total is published; this sums the published towers (86M + 125M) and the 12 cross-modal layers
# (BERT layers with cross-attention: 2 x 4 x (768^2 + 768) + 2 x 768 x 3072 + 3072 + 768 + 3 x 2 x 768
# = 9,451,776 each), the heads left out.
PUBLISHED_PARAMETERS = 86_000_000 + 125_000_000 + 12 * 9_451_776


def _sub_config(values: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values or {})
    return {key: values.get(key, default) for key, default in defaults.items()}


class SubConfig:
    """Attribute access over a plain dict, so sub-configs serialise as the JSON HF writes."""

    def __init__(self, values: Mapping[str, Any]):
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"{type(self).__name__}({self.__dict__})"


class BridgeTowerConfig(PretrainedConfig):
    """Text (RoBERTa) and vision (CLIP ViT) settings plus the cross-modal ones, named as in HF's config.

    ``num_hidden_layers`` / ``num_attention_heads`` / ``hidden_size`` describe the cross-modal encoder;
    as in HF its layers take their attention heads, feed-forward width, activation and dropout from
    ``text_config``, so ``hidden_size`` must equal ``text_config.hidden_size``.
    """

    model_type = "bridgetower"
    is_composition = True

    def __init__(
        self,
        share_cross_modal_transformer_layers: bool = True,
        hidden_act: str = "gelu",
        hidden_size: int = 768,
        initializer_factor: float = 1.0,
        layer_norm_eps: float = 1e-5,
        share_link_tower_layers: bool = False,
        link_tower_type: str = "add",
        num_attention_heads: int = 12,
        num_hidden_layers: int = 6,
        init_layernorm_from_vision_encoder: bool = False,
        text_config: Mapping[str, Any] | None = None,
        vision_config: Mapping[str, Any] | None = None,
        contrastive_hidden_size: int = ITC_DIM,
        logit_scale_init_value: float = LOGIT_SCALE_INIT,
        **kwargs: Any,
    ):
        kwargs.pop("text_config_dict", None)
        kwargs.pop("vision_config_dict", None)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.share_cross_modal_transformer_layers = bool(share_cross_modal_transformer_layers)
        self.hidden_act = hidden_act
        self.hidden_size = int(hidden_size)
        self.initializer_factor = float(initializer_factor)
        self.layer_norm_eps = float(layer_norm_eps)
        self.share_link_tower_layers = bool(share_link_tower_layers)
        self.link_tower_type = link_tower_type
        self.num_attention_heads = int(num_attention_heads)
        self.num_hidden_layers = int(num_hidden_layers)
        self.init_layernorm_from_vision_encoder = bool(init_layernorm_from_vision_encoder)
        self.text_config = SubConfig(_sub_config(text_config, TEXT_DEFAULTS))
        self.vision_config = SubConfig(_sub_config(vision_config, VISION_DEFAULTS))
        self.contrastive_hidden_size = int(contrastive_hidden_size)
        self.logit_scale_init_value = float(logit_scale_init_value)

    def to_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        output = copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in ("text_config", "vision_config")})
        output["text_config"] = self.text_config.to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output

    # -- derived sizes --------------------------------------------------------------------------------

    @property
    def vision_blocks(self) -> int:
        """Residual blocks the vision tower holds (one fewer with ``remove_last_layer``)."""
        vision = self.vision_config
        return int(vision.num_hidden_layers) - (1 if vision.remove_last_layer else 0)

    @property
    def max_text_len(self) -> int:
        """Longest text (specials included) the RoBERTa position table can number."""
        text = self.text_config
        return int(text.max_position_embeddings) - int(text.pad_token_id) - 1

    def validate(self) -> None:
        text, vision = self.text_config, self.vision_config
        problems = []
        if not self.share_cross_modal_transformer_layers:
            # HF builds per-layer transforms in a ModuleList and then calls the list: it cannot run.
            problems.append("share_cross_modal_transformer_layers=False is not supported (nor runnable in HF)")
        if self.link_tower_type not in ("add", "scaled_add", "interpolate"):
            problems.append(f"link_tower_type {self.link_tower_type!r} is not one of add, scaled_add, interpolate")
        if self.hidden_size != int(text.hidden_size):
            problems.append(
                f"hidden_size {self.hidden_size} must equal text_config.hidden_size {text.hidden_size} "
                "(the cross-modal layers are built from the text config)"
            )
        if int(text.hidden_size) % int(text.num_attention_heads):
            problems.append("text_config.hidden_size must be divisible by num_attention_heads")
        if int(vision.hidden_size) % 64:
            problems.append(f"vision_config.hidden_size {vision.hidden_size} must be a multiple of 64 (CLIP head width)")
        if int(vision.image_size) % int(vision.patch_size):
            problems.append("vision_config.image_size must be a multiple of patch_size")
        if not 1 <= self.num_hidden_layers <= int(text.num_hidden_layers):
            problems.append(
                f"num_hidden_layers (cross-modal) {self.num_hidden_layers} must be between 1 and the "
                f"{text.num_hidden_layers} text layers"
            )
        if self.vision_blocks < int(text.num_hidden_layers):
            problems.append(
                f"the vision tower has {self.vision_blocks} blocks but the text tower {text.num_hidden_layers} "
                "layers; layer i of both feeds the same bridge"
            )
        if self.max_text_len < 2:
            problems.append("text_config.max_position_embeddings leaves no room for a text")
        if problems:
            raise ConfigError("invalid BridgeTower config: " + "; ".join(problems))


def tiny_config(vocab_size: int, pad_token_id: int, **overrides: Any) -> BridgeTowerConfig:
    """The ``tiny`` BridgeTower configuration for a vocabulary of ``vocab_size`` tokens padded with ``pad_token_id``."""
    return _config(tiny_architecture("bridgetower", TINY_ARCHITECTURE, overrides), vocab_size, pad_token_id)


def published_config(tokenizer_vocab_size: int, pad_token_id: int) -> BridgeTowerConfig:
    """The published BridgeTower base configuration, for a tokenizer of ``tokenizer_vocab_size``
    tokens padded with ``pad_token_id`` (RoBERTa numbers positions after the padding id)."""
    arch = tiny_architecture("bridgetower", PUBLISHED_ARCHITECTURE, {}, what="published")
    vocab_size = checked_published_vocab("bridgetower", tokenizer_vocab_size, PUBLISHED_VOCAB_SIZE)
    return _config(arch, vocab_size, pad_token_id)


def _config(arch: dict[str, Any], vocab_size: int, pad_token_id: int) -> BridgeTowerConfig:
    if arch["vision_hidden_size"] != 64 * arch["vision_heads"]:
        raise ConfigError("bridgetower vision_hidden_size must be 64 * vision_heads (CLIP's head width)")
    text_config = {
        "vocab_size": int(vocab_size),
        "hidden_size": arch["text_hidden_size"],
        "num_hidden_layers": arch["text_layers"],
        "num_attention_heads": arch["text_heads"],
        "intermediate_size": arch["text_intermediate_size"],
        "max_position_embeddings": arch["max_position_embeddings"],
        "hidden_dropout_prob": arch["hidden_dropout_prob"],
        "attention_probs_dropout_prob": arch["attention_probs_dropout_prob"],
        "pad_token_id": int(pad_token_id),
    }
    vision_config = {
        "image_size": arch["image_size"],
        "patch_size": arch["patch_size"],
        "hidden_size": arch["vision_hidden_size"],
        "num_hidden_layers": arch["vision_layers"],
    }
    return BridgeTowerConfig(
        hidden_size=arch["text_hidden_size"],
        num_attention_heads=arch["text_heads"],
        num_hidden_layers=arch["cross_layers"],
        share_link_tower_layers=arch["share_link_tower_layers"],
        contrastive_hidden_size=arch["itc_dim"],
        text_config=text_config,
        vision_config=vision_config,
    )
