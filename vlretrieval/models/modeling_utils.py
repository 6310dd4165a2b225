"""The two model interfaces, one per kind, and the behaviour every model of a kind shares.

* :class:`DualEncoder` (kind ``"dual_encoder"``) embeds images and texts separately into one
  L2-normalised space and trains with a contrastive loss; retrieval is a dot product.
* :class:`CrossEncoder` (kind ``"cross_encoder"``) scores an (image, text) pair jointly and trains
  with an image-text matching loss; retrieval re-ranks candidates from a dual encoder.

The interfaces are plain mixins rather than ``abc.ABC``: paddlenlp models have their own metaclass,
and ABCMeta cannot be combined with it. A model class lists them *before* its paddle base class,
so the shared ``forward`` and temperature methods take precedence over the base model's own.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import paddle

from .registry import CROSS_ENCODER, DUAL_ENCODER

# CLIP's bound on the logit scale: beyond 100 the softmax saturates and training becomes unstable.
MAX_LOGIT_SCALE = 100.0


class DualEncoderOutput(NamedTuple):
    """What a dual encoder's ``forward`` returns during training: local, un-gathered features.

    ``logit_scale`` is part of the output (not read from the model afterwards) so that the
    temperature is reachable from the outputs; ``paddle.DataParallel`` with
    ``find_unused_parameters`` would otherwise treat it as unused and never all-reduce its gradient.
    """

    image_features: paddle.Tensor  # [n, d], L2-normalised
    text_features: paddle.Tensor  # [n, d], L2-normalised
    logit_scale: paddle.Tensor  # [1] or scalar, exp of the learnable log-temperature


class LearnableTemperature:
    """A model whose contrastive softmax is sharpened by ``exp`` of a learnable log-scale.

    The model names that parameter in :attr:`temperature_parameter` (its state-dict key, which
    each family keeps as its pretrained checkpoints spell it).
    """

    temperature_parameter: ClassVar[str]

    @property
    def log_temperature(self) -> paddle.Tensor:
        """The learnable log-scale parameter itself."""
        # Looked up in the parameter table: in Chinese-CLIP the parameter is called logit_scale,
        # which the logit_scale() method shadows as an attribute.
        return self._parameters[self.temperature_parameter]

    def logit_scale(self) -> paddle.Tensor:
        """The multiplier of the cosine similarities, ``exp(log-temperature)``."""
        return paddle.exp(self.log_temperature)

    @paddle.no_grad()
    def clamp_logit_scale_(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        """Clamp the learnable temperature in place so that ``1 <= logit_scale() <= max_scale``."""
        parameter = self.log_temperature
        parameter.set_value(paddle.clip(parameter, min=0.0, max=math.log(max_scale)))

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (as in ``named_parameters``) that weight decay must not touch."""
        # Decaying the log-scale would pull the logit scale towards 1, i.e. flatten the softmax.
        return {self.temperature_parameter}


class DualEncoder(LearnableTemperature):
    """Mixin for paddle layers that embed images and texts separately (kind ``"dual_encoder"``).

    Implementations provide :meth:`encode_images`, :meth:`encode_texts`, :attr:`embedding_dim` and
    :attr:`temperature_parameter`. ``forward`` returns :class:`DualEncoderOutput` *without*
    gathering across ranks: the loss gathers, once and explicitly
    (:func:`vlretrieval.models.losses.clip_contrastive_loss`).
    """

    def encode_images(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """``[n, 3, H, W]`` normalised pixels -> ``[n, d]`` L2-normalised image embeddings."""
        raise NotImplementedError

    def encode_texts(
        self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor | None = None, **kwargs: Any
    ) -> paddle.Tensor:
        """``[n, L]`` token ids (+ mask) -> ``[n, d]`` L2-normalised text embeddings."""
        raise NotImplementedError

    @property
    def embedding_dim(self) -> int:
        raise NotImplementedError

    def forward(
        self,
        input_ids: paddle.Tensor | None = None,
        pixel_values: paddle.Tensor | None = None,
        attention_mask: paddle.Tensor | None = None,
        **text_inputs: Any,
    ) -> DualEncoderOutput:
        """Local features of ``n`` aligned pairs; further keyword inputs go to :meth:`encode_texts`."""
        if input_ids is None or pixel_values is None:
            raise ValueError(f"{type(self).__name__}.forward needs both input_ids and pixel_values")
        return DualEncoderOutput(
            image_features=self.encode_images(pixel_values),
            text_features=self.encode_texts(input_ids, attention_mask=attention_mask, **text_inputs),
            logit_scale=self.logit_scale(),
        )

    def contrastive_loss(self, output: DualEncoderOutput, *, gather_with_grad: bool = False, group=None):
        """CLIP loss of this model's ``forward`` output, with cross-batch negatives across ranks."""
        from .losses import clip_contrastive_loss

        return clip_contrastive_loss(
            output.image_features,
            output.text_features,
            output.logit_scale,
            gather_with_grad=gather_with_grad,
            group=group,
        )

    def training_loss(self, output: DualEncoderOutput, *, gather_with_grad: bool = False, group=None):
        """The loss the trainer minimises: the contrastive loss."""
        return self.contrastive_loss(output, gather_with_grad=gather_with_grad, group=group)


class CrossEncoder:
    """Mixin for models that score (image, text) pairs jointly (kind ``"cross_encoder"``).

    Families of this kind (VinVL/Oscar+, BridgeTower) implement :meth:`score_pairs` for re-ranking and
    :meth:`itm_loss` for training on positives and sampled hard negatives.
    """

    def score_pairs(self, **inputs: Any) -> paddle.Tensor:
        """Matching score ``[n]`` of ``n`` aligned (image, text) pairs; higher means a better match."""
        raise NotImplementedError

    def itm_loss(self, labels: paddle.Tensor, **inputs: Any) -> paddle.Tensor:
        """Image-text matching loss of ``n`` pairs with binary ``labels`` (1 = matching pair)."""
        raise NotImplementedError

    def training_loss(self, output: Any, **kwargs: Any) -> paddle.Tensor:
        """The loss the trainer minimises, from what ``forward`` returned for a training batch."""
        raise NotImplementedError

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (as in ``named_parameters``) that weight decay must not touch."""
        return set()


KIND_INTERFACES: dict[str, type] = {DUAL_ENCODER: DualEncoder, CROSS_ENCODER: CrossEncoder}


def implemented_kind(model_class: type) -> str:
    """The kind whose interface ``model_class`` implements (exactly one)."""
    kinds = [kind for kind, interface in KIND_INTERFACES.items() if issubclass(model_class, interface)]
    if len(kinds) != 1:
        raise TypeError(
            f"{model_class.__name__} must implement exactly one of {[i.__name__ for i in KIND_INTERFACES.values()]}"
        )
    return kinds[0]


def normal_(param: paddle.Tensor, std: float) -> None:
    """Fill ``param`` in place from ``N(0, std)``, drawn from paddle's global generator."""
    param.set_value(paddle.normal(mean=0.0, std=std, shape=param.shape).astype(param.dtype))
