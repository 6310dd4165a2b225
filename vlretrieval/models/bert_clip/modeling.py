"""BertCLIP behind the dual-encoder interface, following yangjianxin1/CLIP-Chinese
(``component/model.py``, ``train_clip.py``):

* image feature = bias-free linear projection of the CLIP vision transformer's pooled output
  (``ln_post`` of the ``[CLS]`` token); text feature = bias-free linear projection of BERT's pooled
  output (the tanh dense layer over ``[CLS]``, ``text_outputs[1]`` in the seed). Both are
  L2-normalised; the projections map to 512 dimensions by default.
* ``log_logit_scale`` is the log of the logit scale, initialised at 2.6592 = ln(1 / 0.07).
* LiT-tuning (Locked-image Text tuning): the vision transformer is frozen. As in the seed, the lock
  covers the vision transformer only; the visual projection stays trainable. That is what lets
  the text side and the image side meet in a new space: with the projection locked too, a
  from-scratch text tower would have to match image features it has no influence on at all.
  A locked tower gets no gradients (``stop_gradient``), is reported by
  :meth:`BertCLIPModel.frozen_parameter_names` so the trainer builds no optimizer state for it, and
  keeps its dropout and norm layers in evaluation mode even after ``model.train()`` (also when a
  wrapper such as ``paddle.DataParallel`` switches the modes of all sublayers directly).
  ``paddle.DataParallel`` registers only trainable parameters with its gradient reducer, so the
  locked tower is neither all-reduced nor reported as unused (the Trainer turns
  ``find_unused_parameters`` on for a model without recompute; two gloo ranks train this way).
"""

from __future__ import annotations

from typing import Any

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import Constant
from paddlenlp.transformers import BertModel, PretrainedModel
from paddlenlp.transformers.clip.modeling import CLIPVisionTransformer

from ..modeling_utils import DualEncoder, normal_
from .configuration import BertCLIPConfig

VISION_PREFIX = "vision_model."


class BertCLIPPretrainedModel(PretrainedModel):
    config_class = BertCLIPConfig
    base_model_prefix = "bert_clip"

    def _init_weights(self, layer: nn.Layer) -> None:
        # The BERT tower initialises itself (BertPretrainedModel); this covers the rest, with CLIP's scheme.
        if isinstance(layer, CLIPVisionTransformer):
            config = layer.config
            width, depth = config.hidden_size, config.num_hidden_layers
            factor = config.initializer_factor
            normal_(layer.class_embedding, width**-0.5 * factor)
            normal_(layer.conv1.weight, config.initializer_range * factor)
            normal_(layer.positional_embedding.weight, config.initializer_range * factor)
            for sub in layer.sublayers():
                if isinstance(sub, nn.TransformerEncoderLayer):
                    attn_std = width**-0.5 * (2 * depth) ** -0.5 * factor
                    for proj in (sub.self_attn.q_proj, sub.self_attn.k_proj, sub.self_attn.v_proj):
                        normal_(proj.weight, attn_std)
                    normal_(sub.self_attn.out_proj.weight, width**-0.5 * factor)
                    normal_(sub.linear1.weight, (2 * width) ** -0.5 * factor)
                    normal_(sub.linear2.weight, attn_std)
                    for linear in (sub.self_attn.q_proj, sub.self_attn.k_proj, sub.self_attn.v_proj,
                                   sub.self_attn.out_proj, sub.linear1, sub.linear2):
                        if linear.bias is not None:
                            linear.bias.set_value(paddle.zeros_like(linear.bias))
        elif isinstance(layer, BertCLIPModel):
            normal_(layer.visual_projection.weight, layer.visual_projection.weight.shape[0] ** -0.5)
            normal_(layer.text_projection.weight, layer.text_projection.weight.shape[0] ** -0.5)


class BertCLIPModel(DualEncoder, BertCLIPPretrainedModel):
    """BertCLIP behind the :class:`~vlretrieval.models.modeling_utils.DualEncoder` interface."""

    temperature_parameter = "log_logit_scale"

    def __init__(self, config: BertCLIPConfig):
        super().__init__(config)
        self.text_model = BertModel(config.text_config)
        self.vision_model = CLIPVisionTransformer(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias_attr=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias_attr=False)
        self.log_logit_scale = self.create_parameter(
            [1], dtype=paddle.get_default_dtype(), default_initializer=Constant(config.logit_scale_init_value)
        )
        self._image_tower_locked = False
        self.set_image_tower_locked(config.lock_image_tower)

    # -- LiT ----------------------------------------------------------------------------------------

    @property
    def image_tower_locked(self) -> bool:
        return self._image_tower_locked

    def set_image_tower_locked(self, locked: bool) -> None:
        """Lock (LiT) or unlock the vision transformer; the visual projection always trains."""
        locked = bool(locked)
        self._image_tower_locked = locked
        self.config.lock_image_tower = locked
        for param in self.vision_model.parameters():
            param.stop_gradient = locked
        self._set_vision_training(False if locked else self.training)

    def frozen_parameter_names(self) -> set[str]:
        """Names (as in ``named_parameters``) that must get neither gradients nor optimizer state."""
        if not self._image_tower_locked:
            return set()
        return {name for name, _ in self.named_parameters() if name.startswith(VISION_PREFIX)}

    def _set_vision_training(self, mode: bool) -> None:
        self.vision_model.training = mode
        for layer in self.vision_model.sublayers():
            layer.training = mode

    def train(self, mode: bool = True):
        super().train(mode)
        if self._image_tower_locked:
            self._set_vision_training(False)
        return self

    # -- DualEncoder --------------------------------------------------------------------------------

    def encode_images(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        if self._image_tower_locked:
            # paddle.DataParallel.train() flips every sublayer's mode without calling ours.
            if self.vision_model.training:
                self._set_vision_training(False)
            with paddle.no_grad():
                pooled = self.vision_model(pixel_values=pixel_values, return_dict=False)[1]
        else:
            pooled = self.vision_model(pixel_values=pixel_values, return_dict=False)[1]
        return F.normalize(self.visual_projection(pooled), axis=-1)

    def encode_texts(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None = None,
        token_type_ids: paddle.Tensor | None = None,
        position_ids: paddle.Tensor | None = None,
        **_: Any,
    ) -> paddle.Tensor:
        pooled = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            return_dict=False,
        )[1]
        return F.normalize(self.text_projection(pooled), axis=-1)

    @property
    def embedding_dim(self) -> int:
        return int(self.config.projection_dim)
