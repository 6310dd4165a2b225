"""ERNIE-ViL 2.0 behind the dual-encoder interface.

Facts this module relies on (paddlenlp 3.0):

* ``get_image_features`` returns the ViT's ``ln_post([CLS])`` and ``get_text_features`` the ERNIE
  pooler output (tanh dense over ``[CLS]``); there is no projection layer and neither is normalised,
  so :meth:`ErnieViLDualEncoder.encode_images` / ``encode_texts`` normalise them.
* The learnable parameter ``temperature`` is the log of the logit scale: logits are
  ``exp(temperature) * text @ image.T``, initialised at ``ln(1 / 0.07) = 2.6592``.
* ``ErnieViLModel.forward`` all-gathers features whenever a process group exists and "clips" the
  temperature with an out-of-place ``clip`` whose result is discarded. The dual-encoder interface
  replaces that forward: it returns local features, the loss gathers them once, and the
  temperature is clamped in place by ``clamp_logit_scale_``.
"""

from __future__ import annotations

from typing import Any

import paddle
import paddle.nn.functional as F
from paddlenlp.transformers import ErnieViLModel

from ...errors import ConfigError
from ..modeling_utils import DualEncoder


class ErnieViLDualEncoder(DualEncoder, ErnieViLModel):
    """``ErnieViLModel`` behind the :class:`~vlretrieval.models.modeling_utils.DualEncoder` interface.

    Same parameters and state-dict keys as ``ErnieViLModel``, so directories saved by either class load
    into the other.
    """

    temperature_parameter = "temperature"

    def encode_images(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        features = self.get_image_features(pixel_values=pixel_values)
        return F.normalize(features, axis=-1)

    def encode_texts(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None = None,
        token_type_ids: paddle.Tensor | None = None,
        position_ids: paddle.Tensor | None = None,
        task_type_ids: paddle.Tensor | None = None,
        **_: Any,
    ) -> paddle.Tensor:
        features = self.get_text_features(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            task_type_ids=task_type_ids,
        )
        return F.normalize(features, axis=-1)

    @property
    def embedding_dim(self) -> int:
        text_dim = self.config.text_config.hidden_size
        image_dim = self.config.vision_config.hidden_size
        if text_dim != image_dim:
            raise ConfigError(f"ERNIE-ViL text ({text_dim}) and image ({image_dim}) widths differ; features cannot be compared")
        return text_dim
