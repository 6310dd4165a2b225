"""VinVL (Oscar+) cross-encoder for image-text retrieval.

The model follows Oscar's ``ImageBertForSequenceClassification`` as used by ``oscar/run_retrieval.py``:

* text = ``[CLS] caption [SEP] tags [SEP]`` with segment ids 0 for ``[CLS] caption [SEP]`` and 1 for
  ``tags [SEP]``; BERT embeddings (word + position + segment, LayerNorm, dropout). Position ids cover
  the text tokens only (``0..L-1``); regions get no position or segment embedding.
* each region is a 2054-d vector (2048 appearance + 6 box values) projected linearly to the hidden
  size, optionally layer-normalised (``use_img_layernorm``), then dropped out; the regions follow
  the text in one sequence.
* full attention over text and regions (Oscar's default ``att_mask_type`` ``CLR``); padded text
  tokens and padded regions are masked out with an additive ``(1 - mask) * -10000``.
* the BERT pooler (tanh dense layer over position 0), dropout and a ``Linear(hidden, 2)``
  classifier; training minimises the 2-way softmax cross-entropy (Oscar's ``sfmx`` loss).

``use_img_layernorm``: Oscar applies the image LayerNorm only when the checkpoint's config sets it
to a true value; ``run_retrieval.py`` has no flag for it, so a retrieval checkpoint inherits whatever
its pretraining config says (the Oscar+ pretraining script defaults to 0, some VinVL task scripts
to 1). The config default is therefore off, and the converter reads it from ``config.json``.

Scores are the log-odds ``logits[:, 1] - logits[:, 0]`` of the match class: the same ranking as
Oscar's ``softmax(logits)[:, 1]``, without the ties the probability has once it saturates at 1.0 in
float32.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddlenlp.transformers import BertTokenizer, PretrainedConfig, PretrainedModel
from paddlenlp.transformers.bert.modeling import BertEmbeddings, BertPooler

from ..errors import ConfigError
from .base import CROSS_ENCODER, CrossEncoder, ModelFamily, load_pretrained, seeded_build
from .registry import register_family

logger = logging.getLogger(__name__)

FAMILY_NAME = "vinvl"
#: Region feature width of VinVL's detector output: 2048 appearance values and 6 box values.
FEATURE_DIM = 2054
# VinVL retrieval fine-tuning: max_seq_length 70 (caption + tags) and max_img_seq_length 70.
DEFAULT_MAX_LEN = 70
DEFAULT_MAX_REGIONS = 70
# Oscar's additive mask value; float32 exp(-1e4) underflows to exactly 0, so masked keys get no weight.
MASK_VALUE = -10000.0

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


class ITMOutput(NamedTuple):
    """``forward`` output: matching logits ``[n, 2]`` (float32) and the labels given with the batch."""

    logits: paddle.Tensor
    labels: paddle.Tensor | None


class OscarPretrainedModel(PretrainedModel):
    config_class = OscarConfig
    base_model_prefix = "oscar"

    def _init_weights(self, layer: nn.Layer) -> None:
        # BERT's scheme: N(0, initializer_range) weights, zero biases, unit LayerNorms.
        if isinstance(layer, (nn.Linear, nn.Embedding)):
            layer.weight.set_value(
                paddle.normal(mean=0.0, std=self.config.initializer_range, shape=layer.weight.shape).astype(
                    layer.weight.dtype
                )
            )
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                layer.bias.set_value(paddle.zeros_like(layer.bias))
        elif isinstance(layer, nn.LayerNorm):
            layer.weight.set_value(paddle.ones_like(layer.weight))
            layer.bias.set_value(paddle.zeros_like(layer.bias))


class OscarForImageTextMatching(OscarPretrainedModel, CrossEncoder):
    """Oscar/VinVL image-text matching behind the :class:`~vlretrieval.models.base.CrossEncoder` interface."""

    def __init__(self, config: OscarConfig):
        super().__init__(config)
        if int(config.num_labels) != 2:
            raise ConfigError(f"OscarForImageTextMatching is a binary matcher; num_labels must be 2, got {config.num_labels}")
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
            )
        self.embeddings = BertEmbeddings(config)
        layer = nn.TransformerEncoderLayer(
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            dropout=config.hidden_dropout_prob,
            activation=config.hidden_act,
            attn_dropout=config.attention_probs_dropout_prob,
            act_dropout=0,
        )
        self.encoder = nn.TransformerEncoder(layer, config.num_hidden_layers)
        self.pooler = BertPooler(config)
        self.img_embedding = nn.Linear(config.img_feature_dim, config.hidden_size)
        self.img_layer_norm = (
            nn.LayerNorm(config.hidden_size, epsilon=config.img_layer_norm_eps) if config.use_img_layernorm else None
        )
        self.img_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 2)
        # paddle's LayerNorms default to eps 1e-5; BERT checkpoints were trained with layer_norm_eps.
        for sub in [self.embeddings, self.encoder]:
            for norm in sub.sublayers(include_self=True):
                if isinstance(norm, nn.LayerNorm):
                    norm._epsilon = config.layer_norm_eps

    @property
    def feature_dim(self) -> int:
        return int(self.config.img_feature_dim)

    def forward(
        self,
        input_ids: paddle.Tensor,
        token_type_ids: paddle.Tensor | None = None,
        attention_mask: paddle.Tensor | None = None,
        region_features: paddle.Tensor | None = None,
        region_mask: paddle.Tensor | None = None,
        labels: paddle.Tensor | None = None,
        negative_candidates: paddle.Tensor | None = None,
    ) -> ITMOutput:
        """ITM logits of ``n`` pairs (text tokens first, then regions).

        With ``negative_candidates`` k (training batches of :class:`vlretrieval.training.itm.RegionPairCollator`),
        the rows come in groups of one positive and k negatives; each group's highest-scoring negative
        is found without gradients and the output holds the positives and those negatives only, with
        their labels.
        """
        if negative_candidates is not None:
            return self._hardest_negative_forward(
                int(negative_candidates.reshape([-1])[0]), input_ids, token_type_ids, attention_mask,
                region_features, region_mask,
            )
        hidden = self.encode(input_ids, token_type_ids, attention_mask, region_features, region_mask)
        pooled = self.dropout(self.pooler(hidden))
        logits = self.classifier(pooled).astype("float32")
        return ITMOutput(logits=logits, labels=labels)

    def encode(
        self,
        input_ids: paddle.Tensor,
        token_type_ids: paddle.Tensor | None = None,
        attention_mask: paddle.Tensor | None = None,
        region_features: paddle.Tensor | None = None,
        region_mask: paddle.Tensor | None = None,
    ) -> paddle.Tensor:
        """Last hidden states ``[n, L + R, hidden]``: the ``L`` text tokens, then the ``R`` regions."""
        if region_features is None:
            raise ValueError("OscarForImageTextMatching needs region_features [n, R, feature_dim]")
        n, length = input_ids.shape[0], input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"{length} text tokens exceed the model's {self.config.max_position_embeddings} positions"
            )
        if region_features.ndim != 3 or region_features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"region_features must be [n, R, {self.feature_dim}], got {list(region_features.shape)}"
            )
        regions = region_features.shape[1]
        if token_type_ids is None:
            token_type_ids = paddle.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = paddle.ones_like(input_ids)
        if region_mask is None:
            region_mask = paddle.ones([n, regions], dtype="int64")

        text = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        image = self.img_embedding(region_features.astype(text.dtype))
        if self.img_layer_norm is not None:
            image = self.img_layer_norm(image)
        image = self.img_dropout(image)
        hidden = paddle.concat([text, image], axis=1)

        mask = paddle.concat([attention_mask.astype(hidden.dtype), region_mask.astype(hidden.dtype)], axis=1)
        additive = ((1.0 - mask) * MASK_VALUE).unsqueeze([1, 2])
        return self.encoder(hidden, src_mask=additive)

    def _hardest_negative_forward(self, k: int, *inputs: paddle.Tensor | None) -> ITMOutput:
        group = k + 1
        rows = inputs[0].shape[0]
        if rows % group:
            raise ValueError(f"{rows} rows are not groups of one positive and {k} negatives")
        groups = rows // group
        starts = paddle.arange(groups, dtype="int64") * group
        negatives = (starts.unsqueeze(1) + paddle.arange(1, group, dtype="int64")).reshape([-1])
        # Chosen by the model as it scores at evaluation: without dropout noise.
        training = self.training
        self.eval()
        try:
            with paddle.no_grad():
                logits = self(*[None if x is None else paddle.index_select(x, negatives) for x in inputs]).logits
                hardest = (logits[:, 1] - logits[:, 0]).reshape([groups, k]).argmax(axis=1)
        finally:
            self.train(training)
        chosen = paddle.concat([starts, starts + 1 + hardest])
        labels = paddle.concat([paddle.ones([groups], "int64"), paddle.zeros([groups], "int64")])
        output = self(*[None if x is None else paddle.index_select(x, chosen) for x in inputs])
        return ITMOutput(logits=output.logits, labels=labels)

    # -- CrossEncoder -------------------------------------------------------------------------------

    def score_pairs(self, **inputs: Any) -> paddle.Tensor:
        inputs.pop("labels", None)
        logits = self(**inputs).logits
        return logits[:, 1] - logits[:, 0]

    def itm_loss(self, labels: paddle.Tensor, **inputs: Any) -> paddle.Tensor:
        inputs.pop("labels", None)
        return _cross_entropy(self(**inputs).logits, labels)

    def training_loss(self, output: ITMOutput, **_: Any) -> paddle.Tensor:
        if output.labels is None:
            raise ValueError("training needs labels in the batch (1 = matching pair, 0 = not matching)")
        return _cross_entropy(output.logits, output.labels)

    def no_weight_decay_names(self) -> set[str]:
        return set()


class OscarMaskedTokenHead(nn.Layer):
    """BERT's masked-token prediction head over the text positions of :meth:`OscarForImageTextMatching.encode`:
    dense + GELU + LayerNorm, then scores against the model's word embeddings (tied) plus a bias.

    Oscar pretrains with it and drops it before fine-tuning; it is never part of a saved model.
    """

    def __init__(self, model: OscarForImageTextMatching):
        super().__init__()
        config = model.config
        self.word_embeddings = model.embeddings.word_embeddings.weight
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.GELU()
        self.norm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.bias = self.create_parameter([config.vocab_size], is_bias=True)

    def forward(self, text_hidden: paddle.Tensor) -> paddle.Tensor:
        states = self.norm(self.activation(self.transform(text_hidden)))
        return paddle.matmul(states, self.word_embeddings, transpose_y=True) + self.bias


def _cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    return F.cross_entropy(logits, labels.astype("int64").reshape([-1]), reduction="mean")


# --------------------------------------------------------------------------------------------------
# Family
# --------------------------------------------------------------------------------------------------


def tiny_config(vocab_size: int, **overrides: Any) -> OscarConfig:
    """The ``tiny`` Oscar configuration for a vocabulary of ``vocab_size`` tokens."""
    unknown = set(overrides) - set(TINY_ARCHITECTURE)
    if unknown:
        raise ConfigError(
            f"unknown {FAMILY_NAME} tiny architecture keys {sorted(unknown)}; known: {sorted(TINY_ARCHITECTURE)}"
        )
    arch = {**TINY_ARCHITECTURE, **overrides}
    if arch["hidden_size"] % arch["num_attention_heads"]:
        raise ConfigError(
            f"hidden_size {arch['hidden_size']} must be divisible by num_attention_heads {arch['num_attention_heads']}"
        )
    return OscarConfig(vocab_size=int(vocab_size), pad_token_id=0, num_labels=2, **arch)


def _as_ids(values: Any, where: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{where}: token ids must be one-dimensional, got shape {array.shape}")
    return array


@dataclass
class VinVLFamily(ModelFamily):
    """Loading, saving and input assembly of the Oscar/VinVL cross-encoder.

    ``max_regions`` is the default number of regions kept per image (the first ones, in the order the
    detector listed them); ``train_max_len`` / ``eval_max_len`` count caption, tags and the three
    special tokens together.
    """

    max_regions: int = DEFAULT_MAX_REGIONS
    feature_dim: int = FEATURE_DIM
    extra_inputs: ClassVar[tuple[str, ...]] = ("regions",)

    # -- training and ranking data ------------------------------------------------------------------

    def training_dataset(self, model: Any, tokenizer: Any, train_data: str | os.PathLike, *, max_len: int,
                         hparams: dict[str, Any], regions: str | os.PathLike | None = None) -> Any:
        """Binary ITM: each positive pair with one negative, its caption or its image swapped."""
        from ..training.itm import RegionPairDataset

        if regions is None:
            raise ConfigError(f"{self.name} trains on detector regions: give the region store of {train_data}")
        return RegionPairDataset(train_data, regions, self.name, tokenizer,
                                 negative_candidates=hparams["itm_negative_candidates"])

    def training_collator(self, tokenizer: Any, model: Any, *, max_len: int) -> Any:
        from ..training.itm import RegionPairCollator

        return RegionPairCollator(self.name, tokenizer, max_len=max_len, max_regions=self.max_regions)

    def pretrain(self, model: Any, tokenizer: Any, train_data: str | os.PathLike, *,
                 settings: Mapping[str, Any], regions: str | os.PathLike | None = None) -> dict[str, Any]:
        """Oscar's masked-token pretraining over caption and tags, given the regions
        (:func:`vlretrieval.training.pretrain.masked_token_pretraining`)."""
        from ..training.pretrain import masked_token_pretraining

        if regions is None:
            raise ConfigError(f"{self.name} pretrains on detector regions: give the region store of {train_data}")
        return masked_token_pretraining(self.name, model, tokenizer, train_data, regions, settings)

    def pair_scorer(self, model_dir: str | os.PathLike, split_dir: str | os.PathLike, *,
                    regions: str | os.PathLike | None = None, batch_size: int = 256,
                    max_len: int | None = None) -> Any:
        from ..retrieval.rerank import RegionPairScorer

        if regions is None:
            raise ConfigError(f"{self.name} scores pairs from detector regions: give the region store of {split_dir}")
        return RegionPairScorer(model_dir, split_dir, regions, batch_size=batch_size, max_len=max_len)

    # -- construction -------------------------------------------------------------------------------

    def build_tiny(self, vocab_file: str | os.PathLike, *, seed: int = 0, **overrides: Any):
        # The tokenizer keeps reading vocab_file when it is saved, so the file must outlive this call.
        tokenizer = BertTokenizer(vocab_file=os.fspath(vocab_file), do_lower_case=True)
        config = tiny_config(tokenizer.vocab_size, **overrides)
        model = seeded_build(seed, lambda: OscarForImageTextMatching(config))
        model.eval()
        return model, tokenizer

    def load_model(self, source: str | os.PathLike) -> OscarForImageTextMatching:
        """A saved Oscar directory (use :func:`convert_oscar_checkpoint` for torch checkpoints)."""
        model = load_pretrained(OscarForImageTextMatching, source, "Oscar model")
        model.eval()
        return model

    def load_tokenizer(self, source: str | os.PathLike) -> BertTokenizer:
        return load_pretrained(BertTokenizer, source, "BERT tokenizer")

    def save(self, model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, extra_info: dict | None = None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        max_text_len = int(model.config.max_position_embeddings)
        self.write_model_info(
            out_dir,
            {
                "max_text_len": max_text_len,
                "train_max_len": min(self.train_max_len, max_text_len),
                "eval_max_len": min(self.eval_max_len, max_text_len),
                "max_regions": int(self.max_regions),
                "feature_dim": int(model.config.img_feature_dim),
                "vocab_size": int(model.config.vocab_size),
                "use_img_layernorm": bool(model.config.use_img_layernorm),
                **(extra_info or {}),
            },
        )
        return out_dir

    # -- inputs -------------------------------------------------------------------------------------

    def image_size(self, model: Any) -> int:
        """Not defined: the model reads detector region features, not pixels."""
        raise ConfigError(
            f"the {self.name} family reads {FEATURE_DIM}-d region features from a detector, not pixels; "
            "it has no image size or pixel transform"
        )

    def image_transform(self, model_or_size: Any, *, train: bool, hflip: bool = True):
        raise ConfigError(f"the {self.name} family reads region features, not pixels; it has no image transform")

    def text_pieces(self, tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
        """WordPiece ids of each text without special tokens, so captions and tags are tokenized once."""
        return [
            np.asarray(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)), dtype=np.int64).reshape(-1)
            for text in texts
        ]

    def assemble_pairs(
        self,
        tokenizer: Any,
        caption_ids: Sequence[np.ndarray],
        tag_ids: Sequence[np.ndarray],
        regions: Sequence[np.ndarray],
        *,
        max_len: int | None = None,
        max_regions: int | None = None,
        feature_dim: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Model inputs of ``n`` aligned (caption, tags, regions) triples, padded to the longest in the batch.

        Truncation as in Oscar's ``tensorize_example``: the caption keeps up to ``max_len - 2`` pieces;
        the tags get what is left after ``[CLS] caption [SEP]`` and their own ``[SEP]``. A pair with no
        tags has no second segment. Oscar slices the tags with a negative bound when the caption fills
        the whole budget, which overruns ``max_len``; here the tag segment is dropped instead.

        Regions keep their first ``max_regions`` rows; an image without regions gets one masked zero
        row, so every batch has at least one region column.
        """
        max_len = int(self.eval_max_len if max_len is None else max_len)
        max_regions = int(self.max_regions if max_regions is None else max_regions)
        feature_dim = int(self.feature_dim if feature_dim is None else feature_dim)
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        if max_regions < 0:
            raise ValueError(f"max_regions must be >= 0, got {max_regions}")
        n = len(caption_ids)
        if len(tag_ids) != n or len(regions) != n:
            raise ValueError(
                f"caption_ids, tag_ids and regions must be aligned; got {n}, {len(tag_ids)} and {len(regions)}"
            )
        cls_id, sep_id, pad_id = int(tokenizer.cls_token_id), int(tokenizer.sep_token_id), int(tokenizer.pad_token_id)

        sequences, segments = [], []
        for i in range(n):
            caption = _as_ids(caption_ids[i], f"pair {i} caption")[: max_len - 2]
            tags = _as_ids(tag_ids[i], f"pair {i} tags")
            ids = [cls_id, *caption.tolist(), sep_id]
            seg = [0] * len(ids)
            room = max_len - len(ids) - 1
            if tags.size and room >= 0:
                kept = tags[:room].tolist()
                ids += kept + [sep_id]
                seg += [1] * (len(kept) + 1)
            sequences.append(ids)
            segments.append(seg)

        kept_regions = []
        for i in range(n):
            array = np.asarray(regions[i], dtype=np.float32)
            if array.ndim != 2 or array.shape[1] != feature_dim:
                raise ValueError(
                    f"pair {i}: region features must be [num_regions, {feature_dim}], got shape {array.shape}"
                )
            kept_regions.append(array[:max_regions])

        length = max((len(s) for s in sequences), default=2)
        n_regions = max([1] + [len(r) for r in kept_regions])
        input_ids = np.full((n, length), pad_id, dtype=np.int64)
        token_type_ids = np.zeros((n, length), dtype=np.int64)
        attention_mask = np.zeros((n, length), dtype=np.int64)
        region_features = np.zeros((n, n_regions, feature_dim), dtype=np.float32)
        region_mask = np.zeros((n, n_regions), dtype=np.int64)
        for i, (ids, seg, reg) in enumerate(zip(sequences, segments, kept_regions)):
            input_ids[i, : len(ids)] = ids
            token_type_ids[i, : len(seg)] = seg
            attention_mask[i, : len(ids)] = 1
            region_features[i, : len(reg)] = reg
            region_mask[i, : len(reg)] = 1
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "region_features": region_features,
            "region_mask": region_mask,
        }


FAMILY = register_family(
    VinVLFamily(
        name=FAMILY_NAME,
        kind=CROSS_ENCODER,
        description="VinVL (Oscar+) cross-encoder: BERT over caption, detector tags and 2054-d region features",
        default_pretrained=None,
        supports_recompute=False,
        train_max_len=DEFAULT_MAX_LEN,
        eval_max_len=DEFAULT_MAX_LEN,
        tiny=dict(TINY_ARCHITECTURE),
        max_regions=DEFAULT_MAX_REGIONS,
    )
)


# --------------------------------------------------------------------------------------------------
# Conversion of torch Oscar / VinVL checkpoints
# --------------------------------------------------------------------------------------------------

# Heads of Oscar(+) pretraining (masked LM, contrastive/NSP) that a matching model has no use for.
IGNORED_PREFIXES = ("cls.", "bert.cls.", "seq_relationship.", "bert.seq_relationship.")
# Buffers newer transformers versions write into state dicts; they are not weights.
IGNORED_SUFFIXES = ("position_ids",)
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
# Oscar BertConfig fields -> OscarConfig arguments (same names); anything else is ignored.
CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "img_feature_dim", "img_layer_norm_eps", "num_labels",
)
# pytorch-transformers 1.x wrote LayerNorm parameters as gamma/beta, later versions as weight/bias.
_NORM_ALIASES = {"weight": ("weight", "gamma"), "bias": ("bias", "beta")}
_LAYER_PARTS = {
    "self_attn.q_proj": ("attention.self.query", "linear"),
    "self_attn.k_proj": ("attention.self.key", "linear"),
    "self_attn.v_proj": ("attention.self.value", "linear"),
    "self_attn.out_proj": ("attention.output.dense", "linear"),
    "norm1": ("attention.output.LayerNorm", "norm"),
    "linear1": ("intermediate.dense", "linear"),
    "linear2": ("output.dense", "linear"),
    "norm2": ("output.LayerNorm", "norm"),
}
_TOP_PARTS = {
    "embeddings.word_embeddings": ("bert.embeddings.word_embeddings", "embedding"),
    "embeddings.position_embeddings": ("bert.embeddings.position_embeddings", "embedding"),
    "embeddings.token_type_embeddings": ("bert.embeddings.token_type_embeddings", "embedding"),
    "embeddings.layer_norm": ("bert.embeddings.LayerNorm", "norm"),
    "pooler.dense": ("bert.pooler.dense", "linear"),
    "img_embedding": ("bert.img_embedding", "linear"),
    # BertImgModel names its image LayerNorm plain ``LayerNorm``.
    "img_layer_norm": ("bert.LayerNorm", "norm"),
    "classifier": ("classifier", "linear"),
}


@dataclass
class ConversionReport:
    """What a checkpoint conversion did besides copying weights one to one."""

    ignored_keys: list[str] = field(default_factory=list)
    classifier_initialised: bool = False

    def as_info(self) -> dict[str, Any]:
        return {"ignored_keys": list(self.ignored_keys), "classifier_initialised": self.classifier_initialised}

    def lines(self) -> list[str]:
        out = []
        if self.ignored_keys:
            out.append(f"ignored {len(self.ignored_keys)} pretraining-head keys: {', '.join(self.ignored_keys)}")
        if self.classifier_initialised:
            out.append(
                "the checkpoint has no classifier.* (not fine-tuned for retrieval): the matching head "
                "is freshly initialised and must be trained before its scores mean anything"
            )
        return out


def torch_name_map(config: OscarConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """Paddle parameter name -> (accepted torch names, kind) for a model with ``config``.

    ``kind`` is ``linear`` (weight transposed: torch stores ``[out, in]``, paddle ``[in, out]``),
    ``norm`` or ``embedding`` (copied as is).
    """
    parts: dict[str, tuple[str, str]] = {}
    for paddle_part, (torch_part, kind) in _TOP_PARTS.items():
        if paddle_part == "img_layer_norm" and not config.use_img_layernorm:
            continue
        parts[paddle_part] = (torch_part, kind)
    for i in range(config.num_hidden_layers):
        for paddle_part, (torch_part, kind) in _LAYER_PARTS.items():
            parts[f"encoder.layers.{i}.{paddle_part}"] = (f"bert.encoder.layer.{i}.{torch_part}", kind)
    names: dict[str, tuple[tuple[str, ...], str]] = {}
    for paddle_part, (torch_part, kind) in parts.items():
        suffixes = ("weight",) if kind == "embedding" else ("weight", "bias")
        for suffix in suffixes:
            aliases = _NORM_ALIASES[suffix] if kind == "norm" else (suffix,)
            names[f"{paddle_part}.{suffix}"] = (tuple(f"{torch_part}.{alias}" for alias in aliases), kind)
    return names


def oscar_config_from_json(raw: dict[str, Any], where: str | os.PathLike = "config.json") -> OscarConfig:
    """An :class:`OscarConfig` from an Oscar ``BertConfig`` dictionary; refuses what this model cannot run."""
    feature_type = raw.get("img_feature_type")
    if feature_type is not None and str(feature_type).startswith("dis_code"):
        raise ConfigError(f"{where}: img_feature_type {feature_type!r} (discrete codes) is not supported; only region features")
    classifier = raw.get("classifier", "linear")
    if classifier != "linear":
        raise ConfigError(f"{where}: classifier {classifier!r} is not supported; only Oscar's linear classifier")
    num_labels = int(raw.get("num_labels", 2))
    if num_labels != 2:
        raise ConfigError(f"{where}: num_labels is {num_labels}; only binary image-text matching (2) is supported")
    if raw.get("hidden_act", "gelu") not in ("gelu", "relu"):
        raise ConfigError(f"{where}: hidden_act {raw.get('hidden_act')!r} is not supported (gelu or relu)")
    if "img_feature_dim" not in raw:
        raise ConfigError(f"{where}: no img_feature_dim; not an Oscar image-text checkpoint")
    kwargs = {name: raw[name] for name in CONFIG_FIELDS if name in raw}
    # Oscar skips the image LayerNorm when the field is absent or false (it is stored as 0/1).
    kwargs["use_img_layernorm"] = bool(raw.get("use_img_layernorm") or False)
    kwargs["pad_token_id"] = int(raw.get("pad_token_id", 0) or 0)
    return OscarConfig(**kwargs)


def convert_oscar_state(
    state: dict[str, Any], config: OscarConfig, *, seed: int = 0
) -> tuple[OscarForImageTextMatching, ConversionReport]:
    """A paddle model holding the weights of an Oscar torch ``state`` (name -> array-like)."""
    model = seeded_build(seed, lambda: OscarForImageTextMatching(config))
    wanted = model.state_dict()
    names = torch_name_map(config)
    unmapped = sorted(set(wanted) - set(names))
    if unmapped:  # pragma: no cover - a model change without a matching name map
        raise ConfigError(f"no torch name known for paddle parameters {unmapped}")

    report = ConversionReport()
    used: set[str] = set()
    values: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for paddle_name, (candidates, kind) in names.items():
        found = [name for name in candidates if name in state]
        if len(found) > 1:
            raise ConfigError(f"checkpoint holds both {found[0]} and {found[1]} for {paddle_name}")
        if not found:
            missing.append(paddle_name)
            continue
        torch_name = found[0]
        used.add(torch_name)
        array = _to_numpy(state[torch_name])
        transposed = kind == "linear" and paddle_name.endswith(".weight")
        expected = list(wanted[paddle_name].shape)
        expected_torch = expected[::-1] if transposed else expected
        if list(array.shape) != expected_torch:
            raise ConfigError(
                f"checkpoint key {torch_name} has shape {list(array.shape)}, but this config needs "
                f"{expected_torch} (for {paddle_name})"
            )
        if transposed:
            array = array.T
        values[paddle_name] = np.ascontiguousarray(array)

    missing_classifier = [name for name in missing if name in CLASSIFIER_KEYS]
    if len(missing_classifier) == len(CLASSIFIER_KEYS):
        report.classifier_initialised = True
        missing = [name for name in missing if name not in CLASSIFIER_KEYS]
    if missing:
        described = [f"{names[name][0][0]} (for {name})" for name in missing]
        raise ConfigError(f"checkpoint lacks {len(missing)} keys: {', '.join(described)}")

    unknown = []
    for name in sorted(set(state) - used):
        if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
            report.ignored_keys.append(name)
        else:
            unknown.append(f"{name} {list(np.shape(_to_numpy(state[name])))}")
    if unknown:
        raise ConfigError(f"checkpoint has keys this model does not know: {', '.join(unknown)}")

    for paddle_name, array in values.items():
        wanted[paddle_name].set_value(paddle.to_tensor(array.astype(np.float32)).astype(wanted[paddle_name].dtype))
    model.eval()
    return model, report


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bf16/fp16 go through float32
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(
            "converting an Oscar/VinVL checkpoint needs PyTorch to read pytorch_model.bin; install torch (CPU "
            "is enough) in the environment that runs the conversion"
        ) from exc
    return torch


def convert_oscar_checkpoint(
    checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, do_lower_case: bool = True
) -> Path:
    """Convert a torch Oscar/VinVL directory (``pytorch_model.bin``, ``config.json``, ``vocab.txt``)
    into a saved model directory of this family, written atomically; returns ``out_dir``.

    The model info records the ignored pretraining-head keys and whether the matching head was
    freshly initialised (an Oscar+ pretrained checkpoint has no ``classifier``).
    """
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    files = {name: checkpoint_dir / name for name in ("pytorch_model.bin", "config.json", "vocab.txt")}
    absent = [name for name, path in files.items() if not path.is_file()]
    if absent:
        raise ConfigError(f"{checkpoint_dir}: not an Oscar checkpoint directory (missing {', '.join(absent)})")
    with open(files["config.json"], "r", encoding="utf-8") as handle:
        raw = json.load(handle)
    config = oscar_config_from_json(raw, files["config.json"])
    torch = _import_torch()
    try:
        state = torch.load(files["pytorch_model.bin"], map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{files['pytorch_model.bin']}: cannot read the torch state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"{files['pytorch_model.bin']}: expected a state dict, got {type(state).__name__}")
    try:
        model, report = convert_oscar_state(state, config)
    except ConfigError as exc:
        raise ConfigError(f"{checkpoint_dir}: {exc}") from None
    tokenizer = BertTokenizer(vocab_file=str(files["vocab.txt"]), do_lower_case=do_lower_case)
    if tokenizer.vocab_size > config.vocab_size:
        # A smaller vocab.txt only leaves rows unused; a larger one would index past the table.
        raise ConfigError(
            f"{checkpoint_dir}: vocab.txt has {tokenizer.vocab_size} tokens but the embedding table only "
            f"{config.vocab_size} rows"
        )
    for line in report.lines():
        logger.warning("%s: %s", checkpoint_dir, line)
    FAMILY.save_atomic(
        model, tokenizer, out_dir, extra_info={"converted_from": str(checkpoint_dir), **report.as_info()}
    )
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlretrieval.models.vinvl convert --checkpoint DIR --out DIR``."""
    import argparse

    from .base import read_model_info

    parser = argparse.ArgumentParser(prog="python -m vlretrieval.models.vinvl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a torch Oscar/VinVL checkpoint directory")
    convert.add_argument("--checkpoint", type=Path, required=True, help="directory with pytorch_model.bin, config.json, vocab.txt")
    convert.add_argument("--out", type=Path, required=True, help="model directory to write")
    convert.add_argument("--cased", action="store_true", help="keep case when tokenizing (Oscar models are uncased)")
    args = parser.parse_args(argv)
    out = convert_oscar_checkpoint(args.checkpoint, args.out, do_lower_case=not args.cased)
    info = read_model_info(out)
    print(f"{args.checkpoint} converted to {out}")
    for line in ConversionReport(info.get("ignored_keys", []), bool(info.get("classifier_initialised"))).lines():
        print(line)
    return 0


if __name__ == "__main__":
    from ..cli import run

    raise SystemExit(run(main))
