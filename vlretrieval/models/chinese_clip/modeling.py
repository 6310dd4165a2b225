"""Chinese-CLIP behind the dual-encoder interface.

Facts this module relies on (paddlenlp 3.0, checked against OFA-Sys ``cn_clip``):

* Image features are ``ln_post(ViT [CLS]) @ vision_projection``; text features are the ``[CLS]`` row
  of the BERT's last hidden state (no tanh pooler: paddlenlp swaps it for a first-token pooler)
  ``@ text_projection``. Both projections are bias-free matrices to ``projection_dim`` (512 for
  ViT-B/16), so unlike ERNIE-ViL the two towers may have different widths.
* The learnable parameter ``logit_scale`` holds the *log* of the logit scale (initialised at
  ``ln(1 / 0.07) = 2.6592``); the reference clamps it to ``[0, ln 100]`` after every step.
* ``ChineseCLIPModel.forward`` all-gathers the normalised features, without gradient, whenever a
  process group with more than one rank exists, and never clamps the temperature. The dual-encoder
  interface replaces that forward: it returns local features, the loss gathers them once, and the
  temperature is clamped in place by ``clamp_logit_scale_``.
* ``get_text_features`` replaces a missing attention mask by all ones, so padding would be attended
  to; :meth:`ChineseCLIPDualEncoder.encode_texts` derives the mask from the pad id instead, as the
  reference does.

``logit_scale`` is both the parameter's name (state-dict key ``logit_scale``, shared with plain
``ChineseCLIPModel`` directories) and the :class:`DualEncoder` method; the parameter is reached
through ``log_temperature``.
"""

from __future__ import annotations

from typing import Any

import paddle
import paddle.nn.functional as F
from paddlenlp.transformers import ChineseCLIPModel

from ..modeling_utils import DualEncoder


class ChineseCLIPDualEncoder(DualEncoder, ChineseCLIPModel):
    """``ChineseCLIPModel`` behind the :class:`~vlretrieval.models.modeling_utils.DualEncoder` interface.

    Same parameters and state-dict keys as ``ChineseCLIPModel``, so directories saved by either class
    load into the other.
    """

    temperature_parameter = "logit_scale"

    def encode_images(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        features = self.get_image_features(pixel_values=pixel_values)
        return F.normalize(features, axis=-1)

    def encode_texts(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None = None,
        token_type_ids: paddle.Tensor | None = None,
        position_ids: paddle.Tensor | None = None,
        **_: Any,
    ) -> paddle.Tensor:
        if attention_mask is None:
            attention_mask = (input_ids != self.config.text_config.pad_token_id).astype("int64")
        hidden = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            return_dict=True,
        ).last_hidden_state
        # The [CLS] row itself, whatever pooler the text model carries.
        features = paddle.matmul(hidden[:, 0], self.text_projection)
        return F.normalize(features, axis=-1)

    def no_weight_decay_names(self) -> set[str]:
        # The reference recipe exempts the log-temperature (decay would flatten the softmax), every
        # 1-d parameter (norms, biases, the ViT class embedding) and the ViT's ln_pre/ln_post, whose
        # names do not say "norm".
        return {
            name
            for name, param in self.named_parameters()
            if name == self.temperature_parameter or len(param.shape) < 2 or ".ln_" in f".{name}"
        }

    @property
    def embedding_dim(self) -> int:
        return int(self.config.projection_dim)
