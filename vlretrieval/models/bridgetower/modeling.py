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
a batch of 1 on either side is _broadcast against the other.

Fine-tuning
-----------
Called with ``image_ids`` (as :class:`~vlretrieval.models.bridgetower.family.BridgeTowerCollator`
batches are), ``forward`` returns a :class:`BridgeTowerTrainingOutput` and
:meth:`~BridgeTowerForRetrieval.training_loss` is ITC + ITM with equal weights: ITC between the two
towers over the batch gathered from all ranks, every pair of the same image a positive
(:func:`~vlretrieval.models.losses.multi_positive_itc_loss`); ITM over the positives and one hard
negative per text and per image, drawn from the ITC softmax within the local batch
(:func:`sample_hard_negatives`). The cross-modal ITC head takes no part and is frozen
(:meth:`~BridgeTowerForRetrieval.frozen_parameter_names`).
:class:`~vlretrieval.models.bridgetower.scoring.BridgeTowerPairScorer` scores
pairs for re-ranking and gives the ITC first stage.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import Constant
from paddlenlp.transformers import PretrainedModel

from ..losses import multi_positive_itc_loss
from ..modeling_utils import CrossEncoder, LearnableTemperature, normal_
from .configuration import BridgeTowerConfig
from .layers import _CrossLayer, _LinkTower, _TextTower, _VisionTower, _additive_mask, _broadcast

class BridgeTowerPretrainedModel(PretrainedModel):
    config_class = BridgeTowerConfig
    base_model_prefix = "bridgetower"

    def _init_weights(self, layer: nn.Layer) -> None:
        # HF's scheme: N(0, 0.05) for linear/conv/embedding weights, zero biases, unit LayerNorms,
        # then CLIP's depth-scaled initialisation for the vision tower.
        factor = float(self.config.initializer_factor)
        if isinstance(layer, (nn.Linear, nn.Conv2D, nn.Embedding)):
            normal_(layer.weight, 0.05 * factor)
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
                normal_(block.qkv.weight, attn_std * factor)
                normal_(block.proj.weight, proj_std * factor)
                normal_(block.fc1.weight, fc_std * factor)
                normal_(block.fc2.weight, proj_std * factor)
            normal_(layer.class_embedding, attn_std * factor)
            normal_(layer.pos_embed.weight, attn_std * factor)


class BridgeTowerForRetrieval(LearnableTemperature, CrossEncoder, BridgeTowerPretrainedModel):
    """BridgeTower with its ITM head and ITC heads behind the :class:`CrossEncoder` interface."""

    temperature_parameter = "log_logit_scale"

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
    :class:`~vlretrieval.models.modeling_utils.DualEncoderOutput`): ``paddle.DataParallel`` only follows
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
