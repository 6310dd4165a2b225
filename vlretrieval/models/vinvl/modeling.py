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

from typing import Any, NamedTuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddlenlp.transformers import PretrainedModel
from paddlenlp.transformers.bert.modeling import BertEmbeddings, BertPooler

from ...errors import ConfigError
from ..modeling_utils import CrossEncoder
from .configuration import OscarConfig

# Oscar's additive mask value; float32 exp(-1e4) underflows to exactly 0, so masked keys get no weight.
MASK_VALUE = -10000.0


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


class OscarForImageTextMatching(CrossEncoder, OscarPretrainedModel):
    """Oscar/VinVL image-text matching behind the :class:`~vlretrieval.models.modeling_utils.CrossEncoder` interface."""

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

        With ``negative_candidates`` k (training batches of :class:`vlretrieval.models.vinvl.data.RegionPairCollator`),
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
