"""The layers of the BridgeTower port: BERT-style attention and feed-forward blocks, the RoBERTa
text tower, the CLIP vision tower and the bridge ("link tower") layers.

The classes keep their underscored names because the names are part of the saved files: paddle
names a parameter that a layer creates itself after the layer's class (``__vision_tower_0.w_0``),
and ``model_state.pdparams`` records those names.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import Constant

from ...errors import ConfigError
from .configuration import SubConfig

# Same additive mask value as HF's get_extended_attention_mask, so masked logits match bit for bit.
_MASK_VALUE = float(np.finfo(np.float32).min)


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


def _attention_from(text: SubConfig) -> _Attention:
    return _Attention(
        int(text.hidden_size), int(text.num_attention_heads), float(text.attention_probs_dropout_prob),
        float(text.hidden_dropout_prob), float(text.layer_norm_eps),
    )


def _ffn_from(text: SubConfig) -> _FeedForward:
    return _FeedForward(
        int(text.hidden_size), int(text.intermediate_size), text.hidden_act, float(text.hidden_dropout_prob),
        float(text.layer_norm_eps),
    )


class _TextLayer(nn.Layer):
    def __init__(self, text: SubConfig):
        super().__init__()
        self.attention = _attention_from(text)
        self.ffn = _ffn_from(text)

    def forward(self, hidden, mask=None):
        return self.ffn(self.attention(hidden, mask))


class _CrossLayer(nn.Layer):
    def __init__(self, text: SubConfig):
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

    def __init__(self, text: SubConfig):
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
    def __init__(self, vision: SubConfig, blocks: int):
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


def _broadcast(tensor: paddle.Tensor, axis: int, n: int) -> paddle.Tensor:
    """``tensor`` expanded along ``axis`` to ``n`` entries (a side of one paired with a batch)."""
    if tensor.shape[axis] == n:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = n
    return tensor.expand(shape)
