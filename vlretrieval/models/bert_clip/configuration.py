"""BertCLIP configuration: a BERT text config, a CLIP vision config, the projection width and the
LiT switch; the pretrained towers and the ``tiny`` architecture.

Pretrained names: the seed uses ``openai/clip-vit-base-patch32`` (known to paddlenlp) and
``Langboat/mengzi-bert-base``, which paddlenlp does not list; the suggested text tower
(:data:`PRETRAINED_TEXT`) is therefore paddlenlp's ``bert-base-chinese``, and mengzi weights can be
given as a local paddle directory.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from paddlenlp.transformers import BertConfig, CLIPVisionConfig, PretrainedConfig

from ..base import checked_published_vocab, tiny_architecture, tower_configs

PRETRAINED_VISION = "openai/clip-vit-base-patch32"
PRETRAINED_TEXT = "bert-base-chinese"
LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07)

# The demo trains from random weights, so the locked image tower is a *random* ViT, and only the
# trainable visual projection adapts the image side: the tower's random features must already tell
# colours, shapes and grid positions apart linearly. 8 px patches keep the positions apart (16 px
# patches reached a mean recall of only 24); a width of 128 learned better, and faster, than
# 256 (mean recall 59.0 against 56.1, both with the demo recipe: 5 epochs, lr 5e-4, 2 ranks;
# about 5 zero-shot). The text tower is as small as ERNIE-ViL's tiny one.
TINY_ARCHITECTURE: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 8,
    "vision_hidden_size": 128,
    "vision_layers": 2,
    "vision_heads": 4,
    "vision_intermediate_size": 512,
    "text_hidden_size": 64,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate_size": 256,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    # Dropout only slowed these 2-layer towers trained from scratch on the demo: at 3 epochs,
    # 0.1 gave lower fine-tuned recall than 0 for every family (docs/results.md).
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "projection_dim": 64,
    "lock_image_tower": True,
}


# The architecture of PRETRAINED_VISION + PRETRAINED_TEXT: CLIP's ViT-B/32 at 224 px (its image tower
# counts 88M parameters) and bert-base-chinese (BERT-base, vocabulary 21128, 512 positions; 102M),
# with bias-free 512-d projections, the image tower locked.
PUBLISHED_VOCAB_SIZE = 21128
PUBLISHED_ARCHITECTURE: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 32,
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
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "projection_dim": 512,
    "lock_image_tower": True,
}
PUBLISHED_PARAMETERS = 190_000_000  # 88M (CLIP ViT-B/32 image tower) + 102M (bert-base-chinese)


class BertCLIPConfig(PretrainedConfig):
    """A BERT text config, a CLIP vision config, the projection width and the LiT switch."""

    model_type = "bert_clip"
    is_composition = True

    def __init__(
        self,
        text_config: Mapping[str, Any] | None = None,
        vision_config: Mapping[str, Any] | None = None,
        projection_dim: int = 512,
        logit_scale_init_value: float = LOGIT_SCALE_INIT,
        lock_image_tower: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        text_config = dict(text_config.to_dict() if isinstance(text_config, PretrainedConfig) else text_config or {})
        vision_config = dict(
            vision_config.to_dict() if isinstance(vision_config, PretrainedConfig) else vision_config or {}
        )
        # A sub-config's model_type is a class attribute; as a keyword it would only be carried along.
        text_config.pop("model_type", None)
        vision_config.pop("model_type", None)
        self.text_config = BertConfig(**text_config)
        self.vision_config = CLIPVisionConfig(**vision_config)
        self.projection_dim = int(projection_dim)
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.lock_image_tower = bool(lock_image_tower)

    def to_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        output = copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in ("text_config", "vision_config")})
        output["text_config"] = self.text_config.to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output


def tiny_config(vocab_size: int, **overrides: Any) -> BertCLIPConfig:
    """The ``tiny`` BertCLIP configuration for a vocabulary of ``vocab_size`` tokens."""
    return _config(tiny_architecture("bert_clip", TINY_ARCHITECTURE, overrides), vocab_size)


def published_config(tokenizer_vocab_size: int) -> BertCLIPConfig:
    """The published BertCLIP configuration (CLIP ViT-B/32 + bert-base-chinese), for a tokenizer of
    ``tokenizer_vocab_size`` tokens."""
    arch = tiny_architecture("bert_clip", PUBLISHED_ARCHITECTURE, {}, what="published")
    return _config(arch, checked_published_vocab("bert_clip", tokenizer_vocab_size, PUBLISHED_VOCAB_SIZE))


def _config(arch: dict[str, Any], vocab_size: int) -> BertCLIPConfig:
    text_config, vision_config = tower_configs(
        arch, vocab_size, vision_extra={"projection_dim": arch["projection_dim"]}
    )
    return BertCLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=arch["projection_dim"],
        lock_image_tower=arch["lock_image_tower"],
    )
