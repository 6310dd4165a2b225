"""ERNIE-ViL 2.0: a ViT image tower and an ERNIE text tower (paddlenlp ``ErnieViLModel``).

Facts this module relies on (paddlenlp 3.0):

* ``get_image_features`` returns the ViT's ``ln_post([CLS])`` and ``get_text_features`` the ERNIE
  pooler output (tanh dense over ``[CLS]``); there is no projection layer and neither is normalised,
  so :meth:`ErnieViLDualEncoder.encode_images` / ``encode_texts`` normalise them.
* The learnable parameter ``temperature`` is the log of the logit scale: logits are
  ``exp(temperature) * text @ image.T``, initialised at ``ln(1 / 0.07) = 2.6592``.
* ``ErnieViLModel.forward`` all-gathers features whenever a process group exists and "clips" the
  temperature with an out-of-place ``clip`` whose result is discarded. This class replaces that
  forward: it returns local features, the loss gathers them once, and the temperature is clamped in
  place by :meth:`ErnieViLDualEncoder.clamp_logit_scale_`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import paddle
import paddle.nn.functional as F
from paddlenlp.transformers import (
    ErnieViLConfig,
    ErnieViLImageProcessor,
    ErnieViLModel,
    ErnieViLTokenizer,
)

from ..errors import ConfigError
from .base import (
    DUAL_ENCODER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_LOGIT_SCALE,
    DualEncoder,
    DualEncoderOutput,
    ModelFamily,
    load_pretrained,
    seeded_build,
    tiny_architecture,
)
from .registry import register_family

PRETRAINED_NAME = "PaddlePaddle/ernie_vil-2.0-base-zh"

# Small enough to train a few hundred steps on a laptop CPU in minutes, big enough to learn the
# demo's colour/shape/position captions. 64 px images with 16 px patches give 16 patch tokens.
TINY_ARCHITECTURE: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 16,
    "vision_hidden_size": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "vision_intermediate_size": 256,
    "text_hidden_size": 64,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate_size": 256,
    "max_position_embeddings": 64,
    "type_vocab_size": 4,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}


class ErnieViLDualEncoder(ErnieViLModel, DualEncoder):
    """``ErnieViLModel`` behind the :class:`~vlretrieval.models.base.DualEncoder` interface.

    Same parameters and state-dict keys as ``ErnieViLModel``, so directories saved by either class load
    into the other.
    """

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

    def logit_scale(self) -> paddle.Tensor:
        return paddle.exp(self.temperature)

    @paddle.no_grad()
    def clamp_logit_scale_(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        clamped = paddle.clip(self.temperature, min=0.0, max=math.log(max_scale))
        self.temperature.set_value(clamped)

    def no_weight_decay_names(self) -> set[str]:
        # Decaying the log-temperature would pull the logit scale towards 1, i.e. flatten the softmax.
        return {"temperature"}

    @property
    def embedding_dim(self) -> int:
        text_dim = self.config.text_config.hidden_size
        image_dim = self.config.vision_config.hidden_size
        if text_dim != image_dim:
            raise ConfigError(f"ERNIE-ViL text ({text_dim}) and image ({image_dim}) widths differ; features cannot be compared")
        return text_dim

    def forward(
        self,
        input_ids: paddle.Tensor | None = None,
        pixel_values: paddle.Tensor | None = None,
        attention_mask: paddle.Tensor | None = None,
        token_type_ids: paddle.Tensor | None = None,
        position_ids: paddle.Tensor | None = None,
        task_type_ids: paddle.Tensor | None = None,
        **_: Any,
    ) -> DualEncoderOutput:
        if input_ids is None or pixel_values is None:
            raise ValueError("ErnieViLDualEncoder.forward needs both input_ids and pixel_values")
        return DualEncoderOutput(
            image_features=self.encode_images(pixel_values),
            text_features=self.encode_texts(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                task_type_ids=task_type_ids,
            ),
            logit_scale=self.logit_scale(),
        )


def tiny_config(vocab_size: int, **overrides: Any) -> ErnieViLConfig:
    """The ``tiny`` ERNIE-ViL configuration for a vocabulary of ``vocab_size`` tokens."""
    arch = tiny_architecture("ernie_vil", TINY_ARCHITECTURE, overrides)
    if arch["vision_hidden_size"] != arch["text_hidden_size"]:
        raise ConfigError("a dual encoder without projections needs vision_hidden_size == text_hidden_size")
    text_config = {
        "vocab_size": int(vocab_size),
        "hidden_size": arch["text_hidden_size"],
        "num_hidden_layers": arch["text_layers"],
        "num_attention_heads": arch["text_heads"],
        "intermediate_size": arch["text_intermediate_size"],
        "max_position_embeddings": arch["max_position_embeddings"],
        "type_vocab_size": arch["type_vocab_size"],
        "hidden_dropout_prob": arch["hidden_dropout_prob"],
        "attention_probs_dropout_prob": arch["attention_probs_dropout_prob"],
        "pad_token_id": 0,
    }
    vision_config = {
        "image_size": arch["image_size"],
        "patch_size": arch["patch_size"],
        "hidden_size": arch["vision_hidden_size"],
        "num_hidden_layers": arch["vision_layers"],
        "num_attention_heads": arch["vision_heads"],
        "intermediate_size": arch["vision_intermediate_size"],
    }
    return ErnieViLConfig(text_config=text_config, vision_config=vision_config)


class ErnieViLFamily(ModelFamily):
    """Loading, saving, tokenization and preprocessing of ERNIE-ViL 2.0."""

    def build_tiny(self, vocab_file: str | os.PathLike, *, seed: int = 0, **overrides: Any):
        # The tokenizer keeps reading vocab_file when it is saved, so the file must outlive this call.
        tokenizer = ErnieViLTokenizer(vocab_file=os.fspath(vocab_file), do_lower_case=True)
        config = tiny_config(tokenizer.vocab_size, **overrides)
        model = seeded_build(seed, lambda: ErnieViLDualEncoder(config))
        model.eval()
        return model, tokenizer

    def load_model(self, source: str | os.PathLike) -> ErnieViLDualEncoder:
        model = load_pretrained(ErnieViLDualEncoder, source)
        model.eval()
        return model

    def load_tokenizer(self, source: str | os.PathLike) -> ErnieViLTokenizer:
        return load_pretrained(ErnieViLTokenizer, source)

    def save(self, model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, extra_info: dict | None = None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        size = self.image_size(model)
        # Lets ErnieViLProcessor.from_pretrained(out_dir) preprocess like our evaluation transform
        # (square images resize identically; non-square ones get a centre crop there).
        processor = ErnieViLImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
        )
        processor.save_pretrained(str(out_dir))
        self.write_model_info(
            out_dir,
            {
                "image_size": size,
                "embedding_dim": model.embedding_dim,
                "vocab_size": int(model.config.text_config.vocab_size),
                "train_max_len": self.train_max_len,
                "eval_max_len": min(self.eval_max_len, int(model.config.text_config.max_position_embeddings)),
                "max_text_len": int(model.config.text_config.max_position_embeddings),
                **(extra_info or {}),
            },
        )
        return out_dir

    def image_size(self, model: Any) -> int:
        return int(model.config.vision_config.image_size)


FAMILY = register_family(
    ErnieViLFamily(
        name="ernie_vil",
        kind=DUAL_ENCODER,
        description="ERNIE-ViL 2.0 (ViT-B/16 + ERNIE 3.0 Base, 768-d, no projection)",
        default_pretrained=PRETRAINED_NAME,
        supports_recompute=True,
        train_max_len=32,
        eval_max_len=52,
        tiny=dict(TINY_ARCHITECTURE),
    )
)
