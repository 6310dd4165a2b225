"""BridgeTower (Xu et al., AAAI 2023) as a cross encoder: ITM scoring plus its ITC heads, in paddle.

The port follows the Hugging Face ``transformers`` implementation (``BridgeTowerModel``,
``BridgeTowerForImageAndTextRetrieval``, ``BridgeTowerForContrastiveLearning``) rather than the
authors' code, because the published weights are distributed in that format and the converter must
reproduce their outputs; ``docs/bridgetower.md`` lists where the two differ.

Architecture (``K`` = ``config.num_hidden_layers`` cross-modal layers, ``N`` = text layers):

* vision tower: CLIP ViT (class embedding, bias-free patch conv, learned positions, ``ln_pre``,
  pre-LN residual blocks with QuickGELU, ``ln_post``); heads = width // 64 as in CLIP.
* text tower: RoBERTa embeddings (positions counted from ``pad_token_id + 1``, pad tokens keep
  position ``pad_token_id``) and BERT-style post-LN layers.
* the first ``N - K + 1`` layers of both towers run uni-modally; the output of layer ``N - K`` starts
  the cross-modal encoder and each of the following ``K - 1`` uni-modal layers is fed into the
  cross-modal layer of the same depth through a bridge ("link tower": ``LayerNorm(uni + cross)``).
* uni-modal states enter the cross-modal space through a linear transform plus a modality
  embedding (0 = text, 1 = image); images go through ``ln_post`` first.
* each cross-modal layer is self-attention, cross-attention to the other side, feed-forward.
* ITM head: ``Linear(2 * hidden, 2)`` over the concatenated tanh poolers of both ``[CLS]`` tokens.
* ITC heads: text = head(last text layer ``[CLS]``), image = head(transformed last vision layer
  ``[CLS]``), cross = head(pooler output); L2-normalised; ``log_logit_scale`` is the log temperature.

Uni-modal states
----------------
:meth:`BridgeTowerForRetrieval.encode_texts_unimodal` returns one tensor ``[K, n, L, text_hidden]``
and :meth:`~BridgeTowerForRetrieval.encode_images_unimodal` one tensor ``[K, n, 1 + patches,
vision_hidden]``: entry ``k`` is the output of uni-modal layer ``N - K + k`` (images before
``ln_post``). That is everything the cross-modal stack and the ITC heads read, so retrieval encodes
each text and each image once and runs only :meth:`~BridgeTowerForRetrieval.cross_modal` per pair;
a batch of 1 on either side is broadcast against the other.

Fine-tuning
-----------
Called with ``image_ids`` (as :class:`BridgeTowerCollator` batches are), ``forward`` returns a
:class:`BridgeTowerTrainingOutput` and :meth:`~BridgeTowerForRetrieval.training_loss` is ITC + ITM
with equal weights: ITC between the two towers over the batch gathered from all ranks, every pair of
the same image a positive (:func:`multi_positive_itc_loss`); ITM over the positives and one hard
negative per text and per image, drawn from the ITC softmax within the local batch
(:func:`sample_hard_negatives`). The cross-modal ITC head takes no part and is frozen
(:meth:`~BridgeTowerForRetrieval.frozen_parameter_names`). :class:`BridgeTowerPairScorer` scores
pairs for re-ranking and gives the ITC first stage.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import Constant
from paddlenlp.transformers import (
    BertTokenizer,
    CLIPImageProcessor,
    PretrainedConfig,
    PretrainedModel,
    RobertaBPETokenizer,
)

from ..errors import ConfigError
from .base import (
    CROSS_ENCODER,
    MAX_LOGIT_SCALE,
    MODEL_INFO_FILE,
    CrossEncoder,
    ImageTransform,
    ModelFamily,
    load_pretrained,
    seeded_build,
    tiny_architecture,
)
from .registry import register_family

LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07)
ITC_DIM = 256
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Same additive mask value as HF's get_extended_attention_mask, so masked logits match bit for bit.
_MASK_VALUE = float(np.finfo(np.float32).min)

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


class ConversionError(ConfigError):
    """A checkpoint that does not fit the BridgeTower port (unknown key, wrong shape, missing weights)."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _sub_config(values: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values or {})
    return {key: values.get(key, default) for key, default in defaults.items()}


class _SubConfig:
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
        self.text_config = _SubConfig(_sub_config(text_config, TEXT_DEFAULTS))
        self.vision_config = _SubConfig(_sub_config(vision_config, VISION_DEFAULTS))
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


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _quick_gelu(x: paddle.Tensor) -> paddle.Tensor:
    return x * F.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, approximate=False),
    "gelu_new": lambda x: F.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate=True),
    "relu": F.relu,
    "quick_gelu": _quick_gelu,
}


def _activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


def _additive_mask(attention_mask: paddle.Tensor | None) -> paddle.Tensor | None:
    """``[n, L]`` 1/0 mask -> ``[n, 1, 1, L]`` additive mask over the keys."""
    if attention_mask is None:
        return None
    keep = attention_mask.astype("float32")
    return ((1.0 - keep) * _MASK_VALUE).unsqueeze([1, 2])


def _split_heads(x: paddle.Tensor, heads: int) -> paddle.Tensor:
    n, length, width = x.shape
    return x.reshape([n, length, heads, width // heads]).transpose([0, 2, 1, 3])


def _merge_heads(x: paddle.Tensor) -> paddle.Tensor:
    n, heads, length, size = x.shape
    return x.transpose([0, 2, 1, 3]).reshape([n, length, heads * size])


class _Attention(nn.Layer):
    """BERT attention block: multi-head attention, then dense + dropout + post-LN residual."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float, dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, epsilon=eps)

    def forward(self, hidden, mask=None, context=None, context_mask=None):
        # Cross-attention reads keys/values (and their mask) from the other modality.
        source, key_mask = (hidden, mask) if context is None else (context, context_mask)
        q = _split_heads(self.query(hidden), self.heads)
        k = _split_heads(self.key(source), self.heads)
        v = _split_heads(self.value(source), self.heads)
        scores = paddle.matmul(q, k, transpose_y=True) / math.sqrt(q.shape[-1])
        if key_mask is not None:
            scores = scores + key_mask
        probs = self.attn_dropout(F.softmax(scores, axis=-1))
        attended = _merge_heads(paddle.matmul(probs, v))
        return self.norm(self.dropout(self.out(attended)) + hidden)


class _FeedForward(nn.Layer):
    def __init__(self, hidden: int, intermediate: int, act: str, dropout: float, eps: float):
        super().__init__()
        self.fc_in = nn.Linear(hidden, intermediate)
        self.fc_out = nn.Linear(intermediate, hidden)
        self.act = _activation(act)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, epsilon=eps)

    def forward(self, hidden):
        return self.norm(self.dropout(self.fc_out(self.act(self.fc_in(hidden)))) + hidden)


def _attention_from(text: _SubConfig) -> _Attention:
    return _Attention(
        int(text.hidden_size), int(text.num_attention_heads), float(text.attention_probs_dropout_prob),
        float(text.hidden_dropout_prob), float(text.layer_norm_eps),
    )


def _ffn_from(text: _SubConfig) -> _FeedForward:
    return _FeedForward(
        int(text.hidden_size), int(text.intermediate_size), text.hidden_act, float(text.hidden_dropout_prob),
        float(text.layer_norm_eps),
    )


class _TextLayer(nn.Layer):
    def __init__(self, text: _SubConfig):
        super().__init__()
        self.attention = _attention_from(text)
        self.ffn = _ffn_from(text)

    def forward(self, hidden, mask=None):
        return self.ffn(self.attention(hidden, mask))


class _CrossLayer(nn.Layer):
    def __init__(self, text: _SubConfig):
        super().__init__()
        self.attention = _attention_from(text)
        self.cross_attention = _attention_from(text)
        self.ffn = _ffn_from(text)

    def forward(self, hidden, other, mask=None, other_mask=None):
        hidden = self.attention(hidden, mask)
        hidden = self.cross_attention(hidden, context=other, context_mask=other_mask)
        return self.ffn(hidden)


class _TextTower(nn.Layer):
    """RoBERTa embeddings and encoder layers (the pooler is never used by BridgeTower's forward)."""

    def __init__(self, text: _SubConfig):
        super().__init__()
        hidden = int(text.hidden_size)
        self.pad_token_id = int(text.pad_token_id)
        # No padding_idx: paddle would zero the pad row on lookup, torch only at initialisation.
        self.word_embeddings = nn.Embedding(int(text.vocab_size), hidden)
        self.position_embeddings = nn.Embedding(int(text.max_position_embeddings), hidden)
        self.token_type_embeddings = nn.Embedding(int(text.type_vocab_size), hidden)
        self.embed_norm = nn.LayerNorm(hidden, epsilon=float(text.layer_norm_eps))
        self.embed_dropout = nn.Dropout(float(text.hidden_dropout_prob))
        self.layers = nn.LayerList([_TextLayer(text) for _ in range(int(text.num_hidden_layers))])

    def position_ids(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        # fairseq/RoBERTa numbering: real tokens count up from pad + 1, pad tokens sit at pad.
        real = (input_ids != self.pad_token_id).astype("int64")
        return paddle.cumsum(real, axis=1) * real + self.pad_token_id

    def embed(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        embeddings = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings.weight[0]
            + self.position_embeddings(self.position_ids(input_ids))
        )
        return self.embed_dropout(self.embed_norm(embeddings))


class _VisionBlock(nn.Layer):
    """CLIP residual block: pre-LN multi-head attention and a QuickGELU MLP."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.heads = width // 64
        self.ln_1 = nn.LayerNorm(width, epsilon=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, epsilon=eps)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        q, k, v = paddle.split(self.qkv(self.ln_1(x)), 3, axis=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        scores = paddle.matmul(q, k, transpose_y=True) / math.sqrt(q.shape[-1])
        x = x + self.proj(_merge_heads(paddle.matmul(F.softmax(scores, axis=-1), v)))
        return x + self.fc2(_quick_gelu(self.fc1(self.ln_2(x))))


class _VisionTower(nn.Layer):
    def __init__(self, vision: _SubConfig, blocks: int):
        super().__init__()
        width, eps = int(vision.hidden_size), float(vision.layer_norm_eps)
        patch = int(vision.patch_size)
        positions = (int(vision.image_size) // patch) ** 2 + 1
        self.image_size = int(vision.image_size)
        self.class_embedding = self.create_parameter([width], dtype=paddle.get_default_dtype())
        self.patch_embed = nn.Conv2D(int(vision.num_channels), width, patch, stride=patch, bias_attr=False)
        self.pos_embed = nn.Embedding(positions, width)
        self.ln_pre = nn.LayerNorm(width, epsilon=eps)
        self.blocks = nn.LayerList([_VisionBlock(width, eps) for _ in range(blocks)])
        self.ln_post = nn.LayerNorm(width, epsilon=eps)

    def embed(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        height, width = pixel_values.shape[-2:]
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"images must be {self.image_size}x{self.image_size} pixels, got {height}x{width}")
        patches = self.patch_embed(pixel_values.astype(self.patch_embed.weight.dtype))
        patches = patches.flatten(2).transpose([0, 2, 1])
        cls = self.class_embedding.reshape([1, 1, -1]).expand([patches.shape[0], 1, patches.shape[-1]])
        tokens = paddle.concat([cls, patches], axis=1) + self.pos_embed.weight.unsqueeze(0)
        return self.ln_pre(tokens)


class _LinkTower(nn.Layer):
    """Bridge layer: LayerNorm of the uni-modal state merged into the cross-modal one."""

    def __init__(self, kind: str, hidden: int, eps: float):
        super().__init__()
        self.kind = kind
        if kind == "scaled_add":
            self.scaled_factor = self.create_parameter([], default_initializer=Constant(1.0))
        elif kind == "interpolate":
            self.beta = self.create_parameter([], default_initializer=Constant(0.5))
        self.norm = nn.LayerNorm(hidden, epsilon=eps)

    def forward(self, unimodal, cross):
        if self.kind == "scaled_add":
            return self.norm(unimodal * self.scaled_factor + cross)
        if self.kind == "interpolate":
            return self.norm(unimodal * (1 - self.beta) + cross * self.beta)
        return self.norm(unimodal + cross)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class BridgeTowerPretrainedModel(PretrainedModel):
    config_class = BridgeTowerConfig
    base_model_prefix = "bridgetower"

    def _init_weights(self, layer: nn.Layer) -> None:
        # HF's scheme: N(0, 0.05) for linear/conv/embedding weights, zero biases, unit LayerNorms,
        # then CLIP's depth-scaled initialisation for the vision tower.
        factor = float(self.config.initializer_factor)
        if isinstance(layer, (nn.Linear, nn.Conv2D, nn.Embedding)):
            _normal(layer.weight, 0.05 * factor)
            if getattr(layer, "bias", None) is not None:
                layer.bias.set_value(paddle.zeros_like(layer.bias))
        elif isinstance(layer, nn.LayerNorm):
            layer.weight.set_value(paddle.ones_like(layer.weight))
            layer.bias.set_value(paddle.zeros_like(layer.bias))
        elif isinstance(layer, _VisionTower):
            width = layer.class_embedding.shape[0]
            depth = int(self.config.vision_config.num_hidden_layers)
            attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
            proj_std = attn_std * (2 * depth) ** -0.5
            for block in layer.blocks:
                _normal(block.qkv.weight, attn_std * factor)
                _normal(block.proj.weight, proj_std * factor)
                _normal(block.fc1.weight, fc_std * factor)
                _normal(block.fc2.weight, proj_std * factor)
            _normal(layer.class_embedding, attn_std * factor)
            _normal(layer.pos_embed.weight, attn_std * factor)


def _normal(param: paddle.Tensor, std: float) -> None:
    param.set_value(paddle.normal(mean=0.0, std=std, shape=param.shape).astype(param.dtype))


def _broadcast(tensor: paddle.Tensor, axis: int, n: int) -> paddle.Tensor:
    if tensor.shape[axis] == n:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = n
    return tensor.expand(shape)


class BridgeTowerForRetrieval(BridgeTowerPretrainedModel, CrossEncoder):
    """BridgeTower with its ITM head and ITC heads behind the :class:`CrossEncoder` interface."""

    def __init__(self, config: BridgeTowerConfig):
        super().__init__(config)
        config.validate()
        text, vision = config.text_config, config.vision_config
        hidden, eps = config.hidden_size, config.layer_norm_eps
        layers = config.num_hidden_layers
        self.vision = _VisionTower(vision, config.vision_blocks)
        self.text = _TextTower(text)
        self.cross_text_transform = nn.Linear(int(text.hidden_size), hidden)
        self.cross_image_transform = nn.Linear(int(vision.hidden_size), hidden)
        self.modality_embeddings = nn.Embedding(2, hidden)
        self.cross_text_norm = nn.LayerNorm(hidden, epsilon=eps)
        self.cross_image_norm = nn.LayerNorm(hidden, epsilon=eps)
        self.cross_text_layers = nn.LayerList([_CrossLayer(text) for _ in range(layers)])
        self.cross_image_layers = nn.LayerList([_CrossLayer(text) for _ in range(layers)])
        towers = 1 if config.share_link_tower_layers else layers - 1
        kind = config.link_tower_type
        self.text_link_towers = nn.LayerList([_LinkTower(kind, hidden, eps) for _ in range(towers)])
        self.image_link_towers = nn.LayerList([_LinkTower(kind, hidden, eps) for _ in range(towers)])
        self.text_pooler = nn.Linear(hidden, hidden)
        self.image_pooler = nn.Linear(hidden, hidden)
        self.itm_head = nn.Linear(2 * hidden, 2)
        itc = config.contrastive_hidden_size
        self.itc_text_head = nn.Linear(hidden, itc)
        self.itc_image_head = nn.Linear(hidden, itc)
        self.itc_cross_modal_head = nn.Linear(2 * hidden, itc)
        self.log_logit_scale = self.create_parameter(
            [1], dtype=paddle.get_default_dtype(), default_initializer=Constant(config.logit_scale_init_value)
        )

    # -- structure ----------------------------------------------------------------------------------

    @property
    def split_index(self) -> int:
        """Uni-modal layers that run before the first cross-modal layer."""
        return len(self.text.layers) - self.config.num_hidden_layers + 1

    def _link(self, towers: nn.LayerList, index: int) -> _LinkTower:
        return towers[0] if self.config.share_link_tower_layers else towers[index]

    # -- uni-modal towers ---------------------------------------------------------------------------

    def encode_texts_unimodal(
        self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor | None = None
    ) -> paddle.Tensor:
        """``[K, n, L, text_hidden]``: outputs of the top ``K`` text layers (``K`` cross-modal layers)."""
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(
                f"texts of {input_ids.shape[1]} tokens exceed the position table ({self.config.max_text_len} tokens)"
            )
        if attention_mask is None:
            attention_mask = paddle.ones_like(input_ids)
        mask = _additive_mask(attention_mask)
        hidden = self.text.embed(input_ids)
        states = []
        for index, layer in enumerate(self.text.layers):
            hidden = layer(hidden, mask)
            if index >= self.split_index - 1:
                states.append(hidden)
        return paddle.stack(states)

    def encode_images_unimodal(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """``[K, n, 1 + patches, vision_hidden]``: outputs of the vision blocks paired with the top text
        layers, before ``ln_post``. Blocks beyond the text depth are never run (as in HF)."""
        hidden = self.vision.embed(pixel_values)
        states = []
        for index in range(len(self.text.layers)):
            hidden = self.vision.blocks[index](hidden)
            if index >= self.split_index - 1:
                # stop_gradient only cuts gradients; forward values are unchanged.
                states.append(hidden.detach() if self.config.vision_config.stop_gradient else hidden)
        return paddle.stack(states)

    # -- ITC ----------------------------------------------------------------------------------------

    def _image_to_cross(self, state: paddle.Tensor) -> paddle.Tensor:
        return self.cross_image_transform(self.vision.ln_post(state)) + self.modality_embeddings.weight[1]

    def _text_to_cross(self, state: paddle.Tensor) -> paddle.Tensor:
        return self.cross_text_transform(state) + self.modality_embeddings.weight[0]

    def itc_text_features(self, text_states: paddle.Tensor, attention_mask: paddle.Tensor | None = None) -> paddle.Tensor:
        """``[n, itc_dim]`` L2-normalised: the ITC text head over the last text layer's ``[CLS]``.

        ``attention_mask`` is accepted for symmetry with :meth:`cross_modal`; the ``[CLS]`` state
        already reflects it.
        """
        return F.normalize(self.itc_text_head(text_states[-1][:, 0]), axis=-1)

    def itc_image_features(self, image_states: paddle.Tensor) -> paddle.Tensor:
        """``[n, itc_dim]`` L2-normalised: the ITC image head over the last block's ``[CLS]`` after
        ``ln_post``, the cross-modal image transform and the image modality embedding (as HF does)."""
        return F.normalize(self.itc_image_head(self._image_to_cross(image_states[-1][:, 0])), axis=-1)

    def itc_cross_features(self, pooler_output: paddle.Tensor) -> paddle.Tensor:
        """``[n, itc_dim]`` L2-normalised cross-modal embedding of :meth:`cross_modal`'s pooler output."""
        return F.normalize(self.itc_cross_modal_head(pooler_output), axis=-1)

    # -- cross-modal encoder ------------------------------------------------------------------------

    def cross_modal(
        self, text_states: paddle.Tensor, attention_mask: paddle.Tensor | None, image_states: paddle.Tensor
    ) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Run the bridged cross-modal layers on encoded towers.

        Returns the final text ``[CLS]`` ``[n, hidden]``, image ``[CLS]`` ``[n, hidden]`` and the pooler
        output ``[n, 2 * hidden]`` (tanh poolers of both, concatenated). A batch of 1 on one side is
        paired with every entry of the other.
        """
        layers = self.config.num_hidden_layers
        if text_states.shape[0] != layers or image_states.shape[0] != layers:
            raise ValueError(
                f"expected {layers} layer states per side, got {text_states.shape[0]} (text) and "
                f"{image_states.shape[0]} (image)"
            )
        if attention_mask is None:
            attention_mask = paddle.ones(text_states.shape[1:3], dtype="int64")
        n = max(text_states.shape[1], image_states.shape[1])
        if {text_states.shape[1], image_states.shape[1]} - {1, n}:
            raise ValueError(f"cannot pair {text_states.shape[1]} texts with {image_states.shape[1]} images")
        text_states = _broadcast(text_states, 1, n)
        image_states = _broadcast(image_states, 1, n)
        text_mask = _additive_mask(_broadcast(attention_mask, 0, n))
        # Image tokens are never padded, so their (all-zero) mask is left out.
        text = self.cross_text_norm(self._text_to_cross(text_states[0]))
        image = self.cross_image_norm(self._image_to_cross(image_states[0]))
        text_out = self.cross_text_layers[0](text, image, text_mask, None)
        image_out = self.cross_image_layers[0](image, text, None, text_mask)
        for k in range(1, layers):
            text = self._link(self.text_link_towers, k - 1)(self._text_to_cross(text_states[k]), text_out)
            image = self._link(self.image_link_towers, k - 1)(self._image_to_cross(image_states[k]), image_out)
            text_out = self.cross_text_layers[k](text, image, text_mask, None)
            image_out = self.cross_image_layers[k](image, text, None, text_mask)
        text_cls, image_cls = text_out[:, 0], image_out[:, 0]
        pooled = paddle.concat([paddle.tanh(self.text_pooler(text_cls)), paddle.tanh(self.image_pooler(image_cls))], axis=-1)
        return text_cls, image_cls, pooled

    # -- ITM ----------------------------------------------------------------------------------------

    def itm_logits_from_states(
        self, text_states: paddle.Tensor, attention_mask: paddle.Tensor | None, image_states: paddle.Tensor
    ) -> paddle.Tensor:
        """``[n, 2]`` matching logits (index 1 = match) from already encoded towers."""
        return self.itm_head(self.cross_modal(text_states, attention_mask, image_states)[2])

    def itm_logits(
        self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor | None, pixel_values: paddle.Tensor
    ) -> paddle.Tensor:
        return self.itm_logits_from_states(
            self.encode_texts_unimodal(input_ids, attention_mask), attention_mask, self.encode_images_unimodal(pixel_values)
        )

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_ids=None, **_: Any):
        """ITM logits ``[n, 2]`` of aligned pairs; with ``image_ids`` (a training batch) the
        :class:`BridgeTowerTrainingOutput` of :meth:`training_forward` instead."""
        if input_ids is None or pixel_values is None:
            raise ValueError("BridgeTowerForRetrieval.forward needs input_ids and pixel_values")
        if image_ids is not None:
            return self.training_forward(input_ids, attention_mask, pixel_values, image_ids)
        return self.itm_logits(input_ids, attention_mask, pixel_values)

    # -- training (ITC + ITM with hard negatives) ---------------------------------------------------

    def training_forward(
        self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor | None, pixel_values: paddle.Tensor,
        image_ids: paddle.Tensor | np.ndarray,
    ) -> "BridgeTowerTrainingOutput":
        """Everything the ITC + ITM objective needs from a batch of ``n`` aligned (image, text) pairs.

        ``image_ids`` ``[n]`` names each pair's image; pairs that share one are all positives of
        each other, in ITC and when drawing negatives.

        ITM scores ``3n``-ish pairs: the ``n`` positives, each text with one hard negative image and
        each image with one hard negative text. A negative is drawn with probability proportional
        to the softmax of the (detached) ITC similarities, every same-image entry excluded
        (:func:`sample_hard_negatives`), as in ALBEF, METER and BridgeTower. Negatives come from the
        *local* batch only: the cross-modal layers read all ``K`` uni-modal layer states of both
        sides, which other ranks would have to send (and receive gradients for) in full, whereas ITC
        needs only one vector per item and is gathered globally in :meth:`training_loss`. A row
        whose local batch holds no other image has no negative and contributes only its positive.
        """
        if attention_mask is None:
            attention_mask = paddle.ones_like(input_ids)
        if not isinstance(image_ids, paddle.Tensor):
            image_ids = paddle.to_tensor(np.asarray(image_ids, dtype=np.int64))
        image_ids = image_ids.astype("int64").reshape([-1])
        n = input_ids.shape[0]
        if pixel_values.shape[0] != n or image_ids.shape[0] != n:
            raise ValueError(
                f"a training batch pairs texts, images and image ids row by row, got {n} texts, "
                f"{pixel_values.shape[0]} images and {image_ids.shape[0]} image ids"
            )
        text_states = self.encode_texts_unimodal(input_ids, attention_mask)
        image_states = self.encode_images_unimodal(pixel_values)
        text_features = self.itc_text_features(text_states)
        image_features = self.itc_image_features(image_states)
        logit_scale = self.logit_scale()

        with paddle.no_grad():
            similarity = logit_scale.detach() * paddle.matmul(
                text_features.detach(), image_features.detach(), transpose_y=True
            )
            texts_with_negative, negative_images = sample_hard_negatives(similarity, image_ids)
            images_with_negative, negative_texts = sample_hard_negatives(similarity.T, image_ids)

        def take(tensor: paddle.Tensor, index: paddle.Tensor, axis: int) -> paddle.Tensor:
            return paddle.index_select(tensor, index, axis=axis)

        text_side = [text_states, take(text_states, texts_with_negative, 1), take(text_states, negative_texts, 1)]
        mask_side = [attention_mask, take(attention_mask, texts_with_negative, 0), take(attention_mask, negative_texts, 0)]
        image_side = [image_states, take(image_states, negative_images, 1), take(image_states, images_with_negative, 1)]
        itm_logits = self.itm_logits_from_states(
            paddle.concat(text_side, axis=1), paddle.concat(mask_side, axis=0), paddle.concat(image_side, axis=1)
        )
        negatives = texts_with_negative.shape[0] + images_with_negative.shape[0]
        itm_labels = paddle.concat([paddle.ones([n], dtype="int64"), paddle.zeros([negatives], dtype="int64")])
        return BridgeTowerTrainingOutput(
            text_features=text_features,
            image_features=image_features,
            image_ids=image_ids,
            logit_scale=logit_scale,
            itm_logits=itm_logits,
            itm_labels=itm_labels,
        )

    def training_loss_parts(
        self, output: "BridgeTowerTrainingOutput", *, gather_with_grad: bool = False, group=None
    ) -> dict[str, paddle.Tensor]:
        """``{"itc", "itm"}``: the multi-positive contrastive loss over the global batch and the ITM
        cross-entropy over this rank's positives and hard negatives. The training loss is their
        sum; the fine-tuning log records each (``loss_parts``)."""
        itc = multi_positive_itc_loss(
            output.text_features, output.image_features, output.image_ids, output.logit_scale,
            gather_with_grad=gather_with_grad, group=group,
        )
        itm = F.cross_entropy(output.itm_logits, output.itm_labels.reshape([-1]), reduction="mean")
        return {"itc": itc, "itm": itm}

    def training_loss(self, output: "BridgeTowerTrainingOutput", *, gather_with_grad: bool = False, group=None):
        """ITC + ITM with equal weights, as BridgeTower's image-text retrieval fine-tuning."""
        parts = self.training_loss_parts(output, gather_with_grad=gather_with_grad, group=group)
        return parts["itc"] + parts["itm"]

    def frozen_parameter_names(self) -> set[str]:
        """Parameters the training objective never reads, kept out of the optimizer.

        * ``itc_cross_modal_head``: only HF's contrastive pre-training objective uses the cross-modal
          embedding; fine-tuning for retrieval (ITC between the towers + ITM) does not, and a
          trainable parameter that never gets a gradient stalls ``paddle.DataParallel``'s reducer
          unless ``find_unused_parameters`` is on. Freezing keeps its (converted) weights as they
          are instead of adding a third objective the recipe does not have.
        * vision blocks deeper than the text tower, which the forward pass never runs.
        * with ``vision_config.stop_gradient`` the whole vision tower up to ``ln_post``, whose
          outputs are detached.
        """
        depth = len(self.text.layers)
        frozen = set()
        for name, _ in self.named_parameters():
            if name.startswith("itc_cross_modal_head."):
                frozen.add(name)
            elif name.startswith("vision.blocks."):
                if int(name.split(".")[2]) >= depth or self.config.vision_config.stop_gradient:
                    frozen.add(name)
            elif name.startswith("vision.") and not name.startswith("vision.ln_post."):
                if self.config.vision_config.stop_gradient:
                    frozen.add(name)
        return frozen

    def score_pairs(
        self, input_ids: paddle.Tensor = None, attention_mask: paddle.Tensor | None = None,
        pixel_values: paddle.Tensor = None, **_: Any,
    ) -> paddle.Tensor:
        logits = self.itm_logits(input_ids, attention_mask, pixel_values)
        return logits[:, 1] - logits[:, 0]

    def itm_loss(self, labels: paddle.Tensor, **inputs: Any) -> paddle.Tensor:
        logits = self.itm_logits(inputs["input_ids"], inputs.get("attention_mask"), inputs["pixel_values"])
        labels = labels if isinstance(labels, paddle.Tensor) else paddle.to_tensor(labels)
        return F.cross_entropy(logits, labels.astype("int64").reshape([-1]), reduction="mean")

    # -- temperature --------------------------------------------------------------------------------

    def logit_scale(self) -> paddle.Tensor:
        return paddle.exp(self.log_logit_scale)

    @paddle.no_grad()
    def clamp_logit_scale_(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        self.log_logit_scale.set_value(paddle.clip(self.log_logit_scale, min=0.0, max=math.log(max_scale)))

    def no_weight_decay_names(self) -> set[str]:
        # Decaying the log-scale would pull the temperature towards 1, flattening the ITC softmax.
        return {"log_logit_scale"}

    def lr_parameter_groups(self) -> dict[str, tuple[str, ...]]:
        """The parameter groups the reference recipe trains faster than the uni-modal towers
        (``lr_mult_cross_modal`` and ``lr_mult_head``): everything that starts untrained on top of
        the pretrained encoders. The modality embeddings and the temperature are not in either."""
        return {
            "cross_modal": (
                "cross_text_transform", "cross_image_transform", "cross_text_norm", "cross_image_norm",
                "cross_text_layers", "cross_image_layers", "text_link_towers", "image_link_towers",
                "text_pooler", "image_pooler",
            ),
            "heads": ("itm_head", "itc_text_head", "itc_image_head", "itc_cross_modal_head"),
        }


class BridgeTowerTrainingOutput(NamedTuple):
    """What :meth:`BridgeTowerForRetrieval.training_forward` returns; local (un-gathered) values.

    ``logit_scale`` travels with the output so that the temperature is reachable from it (as in
    :class:`~vlretrieval.models.base.DualEncoderOutput`): ``paddle.DataParallel`` only follows
    what the loss reaches from the forward outputs.
    """

    text_features: paddle.Tensor  # [n, itc_dim], L2-normalised
    image_features: paddle.Tensor  # [n, itc_dim], L2-normalised
    image_ids: paddle.Tensor  # [n] int64, the image of each pair
    logit_scale: paddle.Tensor  # [1], exp of the learnable log-temperature
    itm_logits: paddle.Tensor  # [n + negatives, 2]
    itm_labels: paddle.Tensor  # [n + negatives] int64: n ones, then zeros


def sample_hard_negatives(similarity: paddle.Tensor, image_ids: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """One hard negative column for each row of ``similarity`` ``[n, n]`` (rows and columns are the
    pairs of one batch, ``image_ids`` ``[n]`` their images).

    Column ``c`` is drawn for row ``r`` with probability proportional to ``softmax(similarity[r])[c]``
    with every column of the same image as ``r`` set to zero, which is the softmax over the other
    images' columns alone (computed that way, so a dominant positive cannot underflow the rest to
    zero). Rows without any other image in the batch have no negative and are left out. Returns
    ``(rows, columns)``, both int64 ``[m]``.
    """
    image_ids = image_ids.reshape([-1])
    same = image_ids.unsqueeze(1) == image_ids.unsqueeze(0)
    has_negative = paddle.logical_not(same).any(axis=1)
    rows = paddle.nonzero(has_negative).reshape([-1]).astype("int64")
    if rows.shape[0] == 0:
        return rows, rows
    logits = paddle.where(same, paddle.full_like(similarity, -float("inf")), similarity.astype("float32"))
    weights = F.softmax(paddle.index_select(logits, rows, axis=0), axis=1)
    columns = paddle.multinomial(weights, num_samples=1).reshape([-1]).astype("int64")
    return rows, columns


def multi_positive_itc_loss(
    text_features: paddle.Tensor,
    image_features: paddle.Tensor,
    image_ids: paddle.Tensor,
    logit_scale: paddle.Tensor | float,
    *,
    gather_with_grad: bool = False,
    group=None,
) -> paddle.Tensor:
    """This rank's image-text contrastive loss with every same-image pair counted as positive.

    Local rows score against the global batch, as :func:`vlretrieval.training.losses.clip_contrastive_loss`
    does (so the mean over ranks is the full-batch loss). The target of a row is uniform over the
    global columns whose image id equals the row's: a COCO image appears with several captions in
    one batch, and calling those captions negatives would push apart what the data calls a match.
    Soft-target cross-entropy in both directions (text->image, image->text), averaged.
    """
    from ..training.losses import check_equal_batch_sizes, distributed_world, gather_features

    local = text_features.shape[0]
    _, world = distributed_world() if group is None else (group.rank, group.nranks)
    if world > 1:
        check_equal_batch_sizes(local, group)
    all_texts = gather_features(text_features, gather_with_grad=gather_with_grad, group=group)
    all_images = gather_features(image_features, gather_with_grad=gather_with_grad, group=group)
    image_ids = image_ids.reshape([-1]).astype("int64")
    all_ids = gather_features(image_ids, gather_with_grad=False, group=group)
    if isinstance(logit_scale, paddle.Tensor):
        logit_scale = logit_scale.reshape([])
    targets = (image_ids.unsqueeze(1) == all_ids.unsqueeze(0)).astype(text_features.dtype)
    targets = targets / targets.sum(axis=1, keepdim=True)
    logits_per_text = logit_scale * paddle.matmul(text_features, all_images, transpose_y=True)
    logits_per_image = logit_scale * paddle.matmul(image_features, all_texts, transpose_y=True)

    def soft_cross_entropy(logits: paddle.Tensor) -> paddle.Tensor:
        return -(targets * F.log_softmax(logits, axis=1)).sum(axis=1).mean()

    return (soft_cross_entropy(logits_per_text) + soft_cross_entropy(logits_per_image)) / 2.0


# --------------------------------------------------------------------------------------------------
# Family
# --------------------------------------------------------------------------------------------------


def tiny_config(vocab_size: int, pad_token_id: int, **overrides: Any) -> BridgeTowerConfig:
    arch = tiny_architecture("bridgetower", TINY_ARCHITECTURE, overrides)
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


class BridgeTowerFamily(ModelFamily):
    """Loading, saving, tokenization and preprocessing of BridgeTower cross encoders."""

    def build_tiny(self, vocab_file: str | os.PathLike, *, seed: int = 0, **overrides: Any):
        tokenizer = BertTokenizer(vocab_file=os.fspath(vocab_file), do_lower_case=True)
        config = tiny_config(tokenizer.vocab_size, tokenizer.pad_token_id, **overrides)
        model = seeded_build(seed, lambda: BridgeTowerForRetrieval(config))
        model.eval()
        return model, tokenizer

    def load_model(self, source: str | os.PathLike) -> BridgeTowerForRetrieval:
        model = load_pretrained(BridgeTowerForRetrieval, source, "BridgeTower model")
        model.eval()
        return model

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

    def save(self, model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, extra_info: dict | None = None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
        size = self.image_size(model)
        CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        ).save_pretrained(str(out_dir))
        max_text_len = model.config.max_text_len
        self.write_model_info(
            out_dir,
            {
                "image_size": size,
                "max_text_len": max_text_len,
                "train_max_len": min(self.train_max_len, max_text_len),
                "eval_max_len": min(self.eval_max_len, max_text_len),
                "itc_dim": int(model.config.contrastive_hidden_size),
                "vocab_size": int(model.config.text_config.vocab_size),
                "pad_token_id": int(model.config.text_config.pad_token_id),
                "tokenizer_class": type(tokenizer).__name__ if tokenizer is not None else None,
                **(extra_info or {}),
            },
        )
        return out_dir

    # -- training and re-ranking --------------------------------------------------------------------

    def training_dataset(self, model: Any, tokenizer: Any, train_data: str | os.PathLike, *, max_len: int,
                         hparams: dict[str, Any], regions: str | os.PathLike | None = None) -> Any:
        """One augmented (image, caption) pair per item, with its ``image_id``: negatives are drawn
        inside the model from the batch, so the dataset carries none. ``regions`` is not read."""
        return super().training_dataset(model, tokenizer, train_data, max_len=max_len, hparams=hparams)

    def training_collator(self, tokenizer: Any, model: Any, *, max_len: int) -> "BridgeTowerCollator":
        return BridgeTowerCollator(tokenizer.pad_token_id)

    def pair_scorer(self, model_dir: str | os.PathLike, split_dir: str | os.PathLike, *,
                    regions: str | os.PathLike | None = None, batch_size: int = 256,
                    max_len: int | None = None) -> "BridgeTowerPairScorer":
        """Scores from pixels; ``regions`` is not read."""
        return BridgeTowerPairScorer(model_dir, split_dir, batch_size=batch_size, max_len=max_len)

    def image_size(self, model: Any) -> int:
        return int(model.config.vision_config.image_size)

    def with_image_size(self, model: Any, image_size: int) -> "BridgeTowerForRetrieval":
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

    def image_transform(self, model_or_size: Any, *, train: bool, hflip: bool = True) -> ImageTransform:
        size = model_or_size if isinstance(model_or_size, int) else self.image_size(model_or_size)
        return ImageTransform(image_size=size, train=train, hflip=hflip, mean=CLIP_MEAN, std=CLIP_STD)


FAMILY = register_family(
    BridgeTowerFamily(
        name="bridgetower",
        kind=CROSS_ENCODER,
        description="BridgeTower cross encoder (CLIP ViT + RoBERTa, bridged cross-modal layers; ITM + ITC heads)",
        default_pretrained=None,
        supports_recompute=False,
        train_max_len=40,
        eval_max_len=40,
        tiny=dict(TINY_ARCHITECTURE),
    )
)


# --------------------------------------------------------------------------------------------------
# Training batches and pair scoring
# --------------------------------------------------------------------------------------------------


class BridgeTowerCollator:
    """Training batches: ``pixel_values``, ``input_ids``, ``attention_mask`` and ``image_ids``.

    ``image_ids`` marks which pairs share an image (positives of each other); ``text_ids`` is left
    out because the Trainer hands every batch key to ``forward``.
    """

    def __init__(self, pad_token_id: int):
        from ..training.data import PairCollator

        self._collate = PairCollator(pad_token_id, keep_ids=True)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        batch = self._collate(items)
        batch.pop("text_ids")
        return batch


DEFAULT_CACHE_BYTES = 2 << 30


class BridgeTowerPairScorer:
    """:class:`~vlretrieval.retrieval.rerank.PairScorer` of a BridgeTower model over one split.

    Every text and image is encoded uni-modally at most once per scorer when their layer states fit
    in ``cache_bytes`` (texts first: every :meth:`score` call reads a batch of them, while it reads
    a single image); what does not fit is encoded on each call, the last image kept. Each call then
    runs only the cross-modal layers and the ITM head. :meth:`itc_candidates` is BridgeTower's
    first stage: the exact top ``k`` of the ITC similarities, to be re-ranked by :meth:`score`.
    """

    def __init__(self, model_dir: str | os.PathLike, split_dir: str | os.PathLike, *, batch_size: int = 256,
                 max_len: int | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES):
        from ..data.lmdb_store import SplitStore
        from .base import eval_context_length

        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.family = FAMILY
        self.model = FAMILY.load_model(model_dir)
        self.model.eval()
        self.tokenizer = FAMILY.load_tokenizer(model_dir)
        self.batch_size = int(batch_size)
        self.max_len = eval_context_length(model_dir, FAMILY, max_len)
        self.transform = FAMILY.image_transform(self.model, train=False)
        self.store = SplitStore(split_dir)
        texts = self.store.texts()
        self.text_ids = np.asarray([t.text_id for t in texts], dtype=np.int64)
        self.image_ids = np.asarray(self.store.image_ids(), dtype=np.int64)
        encoded = FAMILY.tokenize(self.tokenizer, [t.text for t in texts], max_len=self.max_len)
        self.input_ids = encoded["input_ids"]
        self.attention_mask = encoded["attention_mask"]
        self._lengths = self.attention_mask.sum(axis=1)

        config = self.model.config
        layers, width = config.num_hidden_layers, self.input_ids.shape[1]
        patches = (int(config.vision_config.image_size) // int(config.vision_config.patch_size)) ** 2 + 1
        text_bytes = 4 * layers * len(self.text_ids) * width * int(config.text_config.hidden_size)
        image_bytes = 4 * layers * len(self.image_ids) * patches * int(config.vision_config.hidden_size)
        self._text_cache = self._image_cache = None
        self._last_image: tuple[int, paddle.Tensor] | None = None
        if text_bytes <= cache_bytes:
            self._text_cache = self._encode_texts(np.arange(len(self.text_ids)))
            cache_bytes -= text_bytes
        if image_bytes <= cache_bytes:
            self._image_cache = self._encode_images(np.arange(len(self.image_ids)))
        self._text_features: np.ndarray | None = None
        self._image_features: np.ndarray | None = None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "BridgeTowerPairScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- uni-modal states -----------------------------------------------------------------------------

    def pixel_values(self, image_positions: np.ndarray) -> np.ndarray:
        """Evaluation-preprocessed pixels ``[n, 3, H, W]`` of the images at ``image_positions``."""
        return np.stack([self.transform(self.store.open_image(int(self.image_ids[p]))) for p in image_positions])

    @paddle.no_grad()
    def _encode_texts(self, positions: np.ndarray) -> paddle.Tensor:
        chunks = []
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start:start + self.batch_size]
            chunks.append(self.model.encode_texts_unimodal(
                paddle.to_tensor(self.input_ids[chunk]), paddle.to_tensor(self.attention_mask[chunk])
            ))
        return paddle.concat(chunks, axis=1)

    @paddle.no_grad()
    def _encode_images(self, positions: np.ndarray) -> paddle.Tensor:
        chunks = []
        for start in range(0, len(positions), self.batch_size):
            pixels = self.pixel_values(positions[start:start + self.batch_size])
            chunks.append(self.model.encode_images_unimodal(paddle.to_tensor(pixels)))
        return paddle.concat(chunks, axis=1)

    def _image_states(self, image_index: int) -> paddle.Tensor:
        if self._image_cache is not None:
            return self._image_cache[:, image_index:image_index + 1]
        if self._last_image is None or self._last_image[0] != image_index:
            self._last_image = (image_index, self._encode_images(np.asarray([image_index])))
        return self._last_image[1]

    def _text_states(self, positions: np.ndarray) -> paddle.Tensor:
        if self._text_cache is not None:
            return paddle.index_select(self._text_cache, paddle.to_tensor(positions, dtype="int64"), axis=1)
        return self._encode_texts(positions)

    # -- scoring --------------------------------------------------------------------------------------

    @paddle.no_grad()
    def score(self, image_index: int, text_indices: np.ndarray) -> np.ndarray:
        """ITM log-odds (``logit[match] - logit[no match]``) of image ``image_index`` with each text."""
        text_indices = np.asarray(text_indices, dtype=np.int64).reshape([-1])
        out = np.empty(len(text_indices), dtype=np.float32)
        image_states = self._image_states(int(image_index))
        for start in range(0, len(text_indices), self.batch_size):
            chunk = text_indices[start:start + self.batch_size]
            # Pad columns are masked everywhere, so cutting them off changes no score, only the cost.
            width = int(self._lengths[chunk].max())
            text_states = self._text_states(chunk)[:, :, :width]
            mask = paddle.to_tensor(self.attention_mask[chunk, :width])
            logits = self.model.itm_logits_from_states(text_states, mask, image_states)
            out[start:start + len(chunk)] = (logits[:, 1] - logits[:, 0]).numpy().astype(np.float32, copy=False)
        return out

    @paddle.no_grad()
    def itc_features(self) -> tuple[np.ndarray, np.ndarray]:
        """ITC features of every text ``[n_texts, d]`` and every image ``[n_images, d]``, split order."""
        if self._text_features is None:
            chunks = []
            for start in range(0, len(self.text_ids), self.batch_size):
                positions = np.arange(start, min(start + self.batch_size, len(self.text_ids)))
                # Only the last layer's [CLS] is read, so cached states are sliced rather than copied.
                states = self._text_cache[:, start:start + len(positions)] if self._text_cache is not None \
                    else self._encode_texts(positions)
                chunks.append(self.model.itc_text_features(states).numpy())
            self._text_features = np.concatenate(chunks).astype(np.float32, copy=False)
        if self._image_features is None:
            chunks = []
            for start in range(0, len(self.image_ids), self.batch_size):
                positions = np.arange(start, min(start + self.batch_size, len(self.image_ids)))
                states = self._image_cache[:, start:start + len(positions)] if self._image_cache is not None \
                    else self._encode_images(positions)
                chunks.append(self.model.itc_image_features(states).numpy())
            self._image_features = np.concatenate(chunks).astype(np.float32, copy=False)
        return self._text_features, self._image_features

    def itc_candidates(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``k`` of the ITC similarities: image positions per text ``[n_texts, k]`` and text
        positions per image ``[n_images, k]``, best first, ties by position."""
        from ..retrieval.topk import select_topk

        texts, images = self.itc_features()
        if not 1 <= k <= min(len(texts), len(images)):
            raise ConfigError(f"candidates k={k} must be between 1 and the gallery ({len(images)} images, "
                              f"{len(texts)} texts)")
        similarity = texts @ images.T
        t2i, _ = select_topk(similarity, k)
        i2t, _ = select_topk(np.ascontiguousarray(similarity.T), k)
        return t2i, i2t


# --------------------------------------------------------------------------------------------------
# torch (Hugging Face) checkpoint conversion
# --------------------------------------------------------------------------------------------------

_VISUAL = r"bridgetower\.vision_model\.visual\."
_BLOCK = _VISUAL + r"transformer\.resblocks\.(\d+)\."
_TEXT = r"bridgetower\.text_model\."
_LAYER_PARTS = (
    # (HF sub-name inside a BERT layer, ours)
    (r"attention\.self\.(query|key|value)", r"attention.\g<p1>"),
    (r"attention\.output\.dense", "attention.out"),
    (r"attention\.output\.LayerNorm", "attention.norm"),
    (r"crossattention\.self\.(query|key|value)", r"cross_attention.\g<p1>"),
    (r"crossattention\.output\.dense", "cross_attention.out"),
    (r"crossattention\.output\.LayerNorm", "cross_attention.norm"),
    (r"intermediate\.dense", "ffn.fc_in"),
    (r"output\.dense", "ffn.fc_out"),
    (r"output\.LayerNorm", "ffn.norm"),
)


def _build_name_map() -> list[tuple[re.Pattern, str]]:
    rules: list[tuple[str, str]] = [
        (_VISUAL + r"embeddings\.class_embedding", "vision.class_embedding"),
        (_VISUAL + r"embeddings\.patch_embedding\.weight", "vision.patch_embed.weight"),
        (_VISUAL + r"embeddings\.position_embedding\.weight", "vision.pos_embed.weight"),
        (_VISUAL + r"ln_(?P<which>pre|post)\.(?P<p>weight|bias)", r"vision.ln_\g<which>.\g<p>"),
        (_BLOCK + r"attn\.in_proj_weight", r"vision.blocks.\1.qkv.weight"),
        (_BLOCK + r"attn\.in_proj_bias", r"vision.blocks.\1.qkv.bias"),
        (_BLOCK + r"attn\.out_proj\.(?P<p>weight|bias)", r"vision.blocks.\1.proj.\g<p>"),
        (_BLOCK + r"ln_(?P<i>[12])\.(?P<p>weight|bias)", r"vision.blocks.\1.ln_\g<i>.\g<p>"),
        (_BLOCK + r"mlp\.c_fc\.(?P<p>weight|bias)", r"vision.blocks.\1.fc1.\g<p>"),
        (_BLOCK + r"mlp\.c_proj\.(?P<p>weight|bias)", r"vision.blocks.\1.fc2.\g<p>"),
        (_TEXT + r"embeddings\.(?P<e>word|position|token_type)_embeddings\.weight", r"text.\g<e>_embeddings.weight"),
        (_TEXT + r"embeddings\.LayerNorm\.(?P<p>weight|bias)", r"text.embed_norm.\g<p>"),
        (r"bridgetower\.cross_modal_(?P<m>text|image)_transform\.(?P<p>weight|bias)", r"cross_\g<m>_transform.\g<p>"),
        (r"bridgetower\.token_type_embeddings\.weight", "modality_embeddings.weight"),
        (r"bridgetower\.cross_modal_(?P<m>text|image)_layernorm\.(?P<p>weight|bias)", r"cross_\g<m>_norm.\g<p>"),
        (r"bridgetower\.cross_modal_(?P<m>text|image)_pooler\.dense\.(?P<p>weight|bias)", r"\g<m>_pooler.\g<p>"),
        (
            r"bridgetower\.cross_modal_(?P<m>text|image)_link_tower\.(?P<i>\d+)\.LayerNorm\.(?P<p>weight|bias)",
            r"\g<m>_link_towers.\g<i>.norm.\g<p>",
        ),
        (
            r"bridgetower\.cross_modal_(?P<m>text|image)_link_tower\.(?P<i>\d+)\.(?P<s>scaled_factor|beta)",
            r"\g<m>_link_towers.\g<i>.\g<s>",
        ),
        # A shared link tower is one module in HF; ours is a one-element list.
        (r"bridgetower\.cross_modal_(?P<m>text|image)_link_tower\.LayerNorm\.(?P<p>weight|bias)", r"\g<m>_link_towers.0.norm.\g<p>"),
        (r"bridgetower\.cross_modal_(?P<m>text|image)_link_tower\.(?P<s>scaled_factor|beta)", r"\g<m>_link_towers.0.\g<s>"),
        (r"itm_score\.fc\.(?P<p>weight|bias)", r"itm_head.\g<p>"),
        (r"itc_(?P<h>text|image|cross_modal)_head\.fc\.(?P<p>weight|bias)", r"itc_\g<h>_head.\g<p>"),
        (r"logit_scale", "log_logit_scale"),
    ]
    for hf_part, ours in _LAYER_PARTS:
        hf_part = hf_part.replace("(query|key|value)", "(?P<p1>query|key|value)")
        rules.append((_TEXT + r"encoder\.layer\.(?P<l>\d+)\." + hf_part + r"\.(?P<p>weight|bias)",
                      r"text.layers.\g<l>." + ours + r".\g<p>"))
        rules.append((r"bridgetower\.cross_modal_(?P<m>text|image)_layers\.(?P<l>\d+)\." + hf_part + r"\.(?P<p>weight|bias)",
                      r"cross_\g<m>_layers.\g<l>." + ours + r".\g<p>"))
    return [(re.compile(pattern + r"\Z"), template) for pattern, template in rules]


NAME_MAP = _build_name_map()

# Keys of HF checkpoints that BridgeTower's retrieval/contrastive forward never reads.
IGNORED_KEYS = [
    re.compile(r"bridgetower\.text_model\.pooler\..*"),  # the text tower's own pooler
    re.compile(r"bridgetower\.vision_model\.visual\.ln_separate\..*"),  # only in HF's standalone vision forward
    re.compile(r"mlm_score\..*"),  # masked-LM head of *-itm-mlm checkpoints
    re.compile(r".*\.(position_ids|token_type_ids)"),  # buffers older HF versions saved
]

# Our parameters that a checkpoint may lack: they start from the seeded initialisation instead.
HEAD_PREFIXES = ("itm_head.", "itc_text_head.", "itc_image_head.", "itc_cross_modal_head.", "log_logit_scale")
_HEAD_KEYS = ("itm_score.", "mlm_score.", "itc_", "logit_scale")


def hf_to_ours(name: str) -> str | None:
    """Our parameter name for the HF checkpoint key ``name`` (with ``bridgetower.`` prefix), or None."""
    for pattern, template in NAME_MAP:
        match = pattern.match(name)
        if match:
            return match.expand(template)
    return None


@dataclass
class ConversionReport:
    sources: list[str]
    converted: int = 0
    ignored: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"sources": self.sources, "converted": self.converted, "ignored": self.ignored, "fresh": self.fresh}


def _linear_weight_names(model: nn.Layer) -> set[str]:
    return {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}


def convert_state_dict(
    hf_state: Mapping[str, np.ndarray], model: BridgeTowerForRetrieval, report: ConversionReport | None = None
) -> dict[str, np.ndarray]:
    """HF keys/arrays -> our state dict for ``model`` (Linear weights transposed, conv weights not).

    Unknown keys, shape mismatches and missing non-head weights raise :class:`ConversionError`;
    missing heads keep ``model``'s current values and are listed in ``report.fresh``.
    """
    report = report if report is not None else ConversionReport(sources=[])
    target = {name: list(value.shape) for name, value in model.state_dict().items()}
    linear = _linear_weight_names(model)
    converted: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    unknown = []
    for key in sorted(hf_state):
        name = key if key.startswith("bridgetower.") or key.startswith(_HEAD_KEYS) else "bridgetower." + key
        if any(pattern.fullmatch(name) for pattern in IGNORED_KEYS):
            report.ignored.append(key)
            continue
        ours = hf_to_ours(name)
        if ours is None or ours not in target:
            unknown.append(f"{key}" + ("" if ours is None else f" (-> {ours}, which this config does not have)"))
            continue
        value = np.asarray(hf_state[key], dtype=np.float32)
        if ours in linear and value.ndim == 2:
            value = value.T
        if ours == "log_logit_scale" and value.size == 1:
            value = value.reshape([1])
        if list(value.shape) != target[ours]:
            raise ConversionError(
                f"checkpoint key {key!r} -> {ours!r}: shape {list(np.shape(hf_state[key]))} "
                f"(as ours {list(value.shape)}) does not match the model's {target[ours]}"
            )
        if ours in converted:
            raise ConversionError(f"checkpoint keys {origin[ours]!r} and {key!r} both map to {ours!r}")
        converted[ours] = np.ascontiguousarray(value)
        origin[ours] = key
    if unknown:
        raise ConversionError(f"unknown checkpoint keys ({len(unknown)}): {', '.join(unknown[:10])}")
    missing = sorted(set(target) - set(converted))
    fresh = [name for name in missing if name.startswith(HEAD_PREFIXES)]
    lacking = [name for name in missing if not name.startswith(HEAD_PREFIXES)]
    if lacking:
        raise ConversionError(f"checkpoint lacks {len(lacking)} weights of the model: {', '.join(lacking[:10])}")
    report.fresh.extend(fresh)
    report.converted += len(converted)
    return converted


def config_from_hf(hf_config: Mapping[str, Any]) -> BridgeTowerConfig:
    """Our config from an HF ``BridgeTowerConfig`` dict (``config.json``); HF defaults fill the gaps."""
    hf_config = dict(hf_config)
    top = {
        key: hf_config[key]
        for key in (
            "share_cross_modal_transformer_layers", "hidden_act", "hidden_size", "initializer_factor",
            "layer_norm_eps", "share_link_tower_layers", "link_tower_type", "num_attention_heads",
            "num_hidden_layers", "init_layernorm_from_vision_encoder", "contrastive_hidden_size",
            "logit_scale_init_value", "tie_word_embeddings",
        )
        if key in hf_config
    }
    text = hf_config.get("text_config") or hf_config.get("text_config_dict") or {}
    vision = hf_config.get("vision_config") or hf_config.get("vision_config_dict") or {}
    return BridgeTowerConfig(text_config=text, vision_config=vision, **top)


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _load_weight_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConversionError(f"{path}: reading a torch checkpoint needs torch installed") from exc
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: not a state dict")
    return {key: value.detach().float().numpy() for key, value in state.items() if hasattr(value, "detach")}


def _load_source(source: Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The state dict and (when next to it) the HF config of a checkpoint directory or file."""
    if source.is_dir():
        config_path = source / "config.json"
        found = next((source / name for name in _WEIGHT_FILES if (source / name).is_file()), None)
        if found is None:
            raise ConversionError(f"{source}: no {' / '.join(_WEIGHT_FILES)} in the directory")
        if found.name.endswith(".index.json"):
            shards = sorted(set(json.loads(found.read_text(encoding="utf-8"))["weight_map"].values()))
            state: dict[str, np.ndarray] = {}
            for shard in shards:
                state.update(_load_weight_file(source / shard))
        else:
            state = _load_weight_file(found)
    elif source.is_file():
        config_path = source.parent / "config.json"
        state = _load_weight_file(source)
    else:
        raise ConversionError(f"{source}: checkpoint not found")
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    return state, config


def _merge(states: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    merged: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for source, state in states:
        for key, value in state.items():
            if key in merged:
                if merged[key].shape != value.shape or not np.array_equal(merged[key], value):
                    raise ConversionError(f"checkpoint key {key!r} differs between {where[key]} and {source}")
                continue
            merged[key], where[key] = value, source
    return merged


def _roberta_tokenizer(directory: Path | None) -> RobertaBPETokenizer | None:
    if directory is None or not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
        return None
    return RobertaBPETokenizer(vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"))


def convert_bridgetower_checkpoint(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Convert HF BridgeTower checkpoint(s) into a model directory :data:`FAMILY` loads.

    ``source`` is an HF directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``,
    e.g. a ``BridgeTowerForImageAndTextRetrieval`` or ``BridgeTowerForContrastiveLearning`` save) or
    a state-dict file, or a list of them whose state dicts are merged (shared keys must agree), so
    the ITM head of a retrieval checkpoint and the ITC heads of a contrastive one end up together.
    ``config`` (dict or ``config.json`` path) is needed when no ``config.json`` sits next to the
    first source. Heads absent from every source start from the ``seed`` initialisation and are
    listed under ``conversion.fresh`` in the model info. The RoBERTa tokenizer (``vocab.json`` +
    ``merges.txt``) comes from ``tokenizer_dir`` or else from the first source directory holding one.
    """
    sources = [Path(os.fspath(s)).expanduser() for s in ([source] if isinstance(source, (str, os.PathLike)) else source)]
    if not sources:
        raise ConversionError("no checkpoint given")
    loaded = [(str(s), *_load_source(s)) for s in sources]
    if isinstance(config, (str, os.PathLike)):
        hf_config = json.loads(Path(config).read_text(encoding="utf-8"))
    elif config is not None:
        hf_config = dict(config)
    else:
        hf_config = next((c for _, _, c in loaded if c is not None), None)
    if hf_config is None:
        raise ConversionError(f"{sources[0]}: no config.json next to the checkpoint; pass config=")
    ours = config_from_hf(hf_config)
    state = _merge([(name, st) for name, st, _ in loaded])
    report = ConversionReport(sources=[str(s) for s in sources])
    model = seeded_build(seed, lambda: BridgeTowerForRetrieval(ours))
    converted = convert_state_dict(state, model, report)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in converted.items()})
    model.eval()
    candidates = [Path(os.fspath(tokenizer_dir)).expanduser()] if tokenizer_dir is not None else [
        s if s.is_dir() else s.parent for s in sources
    ]
    tokenizer = next((t for t in map(_roberta_tokenizer, candidates) if t is not None), None)
    if tokenizer_dir is not None and tokenizer is None:
        raise ConversionError(f"{tokenizer_dir}: no vocab.json + merges.txt (RoBERTa BPE tokenizer)")
    extra = {"init": "converted", "conversion": report.as_dict()}
    return FAMILY.save_atomic(model, tokenizer, out_dir, extra_info=extra)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlretrieval.models.bridgetower convert --checkpoint PATH --out DIR``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlretrieval.models.bridgetower", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a Hugging Face (torch) BridgeTower checkpoint")
    convert.add_argument("--checkpoint", action="append", required=True,
                         help="HF model directory or state-dict file; repeat to merge heads from several")
    convert.add_argument("--out", type=Path, required=True, help="model directory to write")
    convert.add_argument("--tokenizer", default=None, help="directory with vocab.json + merges.txt")
    convert.add_argument("--config", default=None, help="HF config.json, when none sits next to the checkpoint")
    convert.add_argument("--seed", type=int, default=0, help="initialisation of heads the checkpoint lacks")
    args = parser.parse_args(argv)
    out = convert_bridgetower_checkpoint(
        args.checkpoint, args.out, tokenizer_dir=args.tokenizer, config=args.config, seed=args.seed
    )
    info = json.loads((out / MODEL_INFO_FILE).read_text(encoding="utf-8"))
    conversion = info["conversion"]
    print(f"converted {conversion['converted']} tensors into {out}")
    if conversion["fresh"]:
        print(f"freshly initialised (absent from the checkpoint): {', '.join(conversion['fresh'])}")
    if conversion["ignored"]:
        print(f"ignored (unused by the forward pass): {len(conversion['ignored'])} keys")
    if info.get("tokenizer_class") is None:
        print("warning: no tokenizer written; pass --tokenizer DIR with vocab.json + merges.txt")
    return 0


if __name__ == "__main__":
    from ..cli import run

    raise SystemExit(run(main))
