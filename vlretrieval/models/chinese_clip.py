"""Chinese-CLIP (OFA-Sys): a CLIP ViT image tower and a Chinese RoBERTa text tower (paddlenlp ``ChineseCLIPModel``).

Facts this module relies on (paddlenlp 3.0, checked against OFA-Sys ``cn_clip``):

* Image features are ``ln_post(ViT [CLS]) @ vision_projection``; text features are the ``[CLS]`` row
  of the BERT's last hidden state (no tanh pooler: paddlenlp swaps it for a first-token pooler)
  ``@ text_projection``. Both projections are bias-free matrices to ``projection_dim`` (512 for
  ViT-B/16), so unlike ERNIE-ViL the two towers may have different widths.
* The learnable parameter ``logit_scale`` holds the *log* of the logit scale (initialised at
  ``ln(1 / 0.07) = 2.6592``); the reference clamps it to ``[0, ln 100]`` after every step.
* ``ChineseCLIPModel.forward`` all-gathers the normalised features, without gradient, whenever a
  process group with more than one rank exists, and never clamps the temperature. This class
  replaces that forward: it returns local features, the loss gathers them once, and the temperature
  is clamped in place by :meth:`ChineseCLIPDualEncoder.clamp_logit_scale_`.
* ``get_text_features`` replaces a missing attention mask by all ones, so padding would be attended
  to; :meth:`ChineseCLIPDualEncoder.encode_texts` derives the mask from the pad id instead, as the
  reference does.
* Images are normalised with CLIP's mean and std, not ImageNet's; evaluation resizes the whole
  image to a square (bicubic), training uses RandomResizedCrop with scale 0.9-1.0.

Because ``logit_scale`` is both the parameter's name (state-dict key ``logit_scale``, shared with
plain ``ChineseCLIPModel`` directories) and the :class:`DualEncoder` method, the parameter is reached
through :attr:`ChineseCLIPDualEncoder.log_logit_scale`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import paddle
import paddle.nn.functional as F
from paddlenlp.transformers import (
    ChineseCLIPConfig,
    ChineseCLIPImageProcessor,
    ChineseCLIPModel,
    ChineseCLIPTokenizer,
)
from paddlenlp.transformers.chineseclip.modeling import CHINESE_CLIP_PRETRAINED_MODEL_ARCHIVE_LIST

from ..errors import ConfigError
from .base import (
    DUAL_ENCODER,
    MAX_LOGIT_SCALE,
    DualEncoder,
    DualEncoderOutput,
    ImageTransform,
    ModelFamily,
    load_pretrained,
    seeded_build,
    tiny_architecture,
)
from .registry import register_family

PRETRAINED_NAME = "OFA-Sys/chinese-clip-vit-base-patch16"
#: The Chinese-CLIP checkpoints paddlenlp resolves by name (community models on its hub).
PRETRAINED_NAMES: tuple[str, ...] = tuple(CHINESE_CLIP_PRETRAINED_MODEL_ARCHIVE_LIST)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The reference pipeline (cn_clip's text preprocessing) maps curly double quotes to ASCII before
# tokenizing, for training and evaluation alike, so the pretrained weights only ever saw '"'.
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"'})

# Same budget as the ERNIE-ViL tiny model: trains a few hundred steps on a laptop CPU in minutes and
# learns the demo's colour/shape/position captions. 64 px images with 16 px patches give 16 tokens.
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
    "type_vocab_size": 2,
    "projection_dim": 64,
    # Std of the text tower's normal init. The reference's 0.02 is sized for 768-wide layers; at
    # width 64 it leaves every text layer close to the identity, and the demo recipe then learns
    # much slower (fine-tuned mean recall about 40 instead of 67).
    "initializer_range": 0.07,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}


class ChineseCLIPDualEncoder(ChineseCLIPModel, DualEncoder):
    """``ChineseCLIPModel`` behind the :class:`~vlretrieval.models.base.DualEncoder` interface.

    Same parameters and state-dict keys as ``ChineseCLIPModel``, so directories saved by either class
    load into the other.
    """

    @property
    def log_logit_scale(self) -> paddle.Tensor:
        """The learnable parameter ``logit_scale`` (a log), shadowed by the :meth:`logit_scale` method."""
        return self._parameters["logit_scale"]

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

    def logit_scale(self) -> paddle.Tensor:
        return paddle.exp(self.log_logit_scale)

    @paddle.no_grad()
    def clamp_logit_scale_(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        parameter = self.log_logit_scale
        parameter.set_value(paddle.clip(parameter, min=0.0, max=math.log(max_scale)))

    def no_weight_decay_names(self) -> set[str]:
        # The reference recipe exempts the log-temperature (decay would flatten the softmax), every
        # 1-d parameter (norms, biases, the ViT class embedding) and the ViT's ln_pre/ln_post, whose
        # names do not say "norm".
        return {
            name
            for name, param in self.named_parameters()
            if name == "logit_scale" or len(param.shape) < 2 or ".ln_" in f".{name}"
        }

    @property
    def embedding_dim(self) -> int:
        return int(self.config.projection_dim)

    def forward(
        self,
        input_ids: paddle.Tensor | None = None,
        pixel_values: paddle.Tensor | None = None,
        attention_mask: paddle.Tensor | None = None,
        token_type_ids: paddle.Tensor | None = None,
        position_ids: paddle.Tensor | None = None,
        **_: Any,
    ) -> DualEncoderOutput:
        if input_ids is None or pixel_values is None:
            raise ValueError("ChineseCLIPDualEncoder.forward needs both input_ids and pixel_values")
        return DualEncoderOutput(
            image_features=self.encode_images(pixel_values),
            text_features=self.encode_texts(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
            ),
            logit_scale=self.logit_scale(),
        )


def tiny_config(vocab_size: int, **overrides: Any) -> ChineseCLIPConfig:
    """The ``tiny`` Chinese-CLIP configuration for a vocabulary of ``vocab_size`` tokens."""
    arch = tiny_architecture("chinese_clip", TINY_ARCHITECTURE, overrides)
    if arch["projection_dim"] < 1:
        raise ConfigError(f"projection_dim must be positive, got {arch['projection_dim']}")
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
        "initializer_range": arch["initializer_range"],
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
    config = ChineseCLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=arch["projection_dim"],
        logit_scale_init_value=math.log(1 / 0.07),
    )
    # ChineseCLIPConfig pins initializer_range to 0.02 in its constructor, and the text tower's
    # init reads the top-level value, so it can only be set afterwards.
    config.initializer_range = float(arch["initializer_range"])
    return config


class ChineseCLIPFamily(ModelFamily):
    """Loading, saving, tokenization and preprocessing of Chinese-CLIP."""

    def build_tiny(self, vocab_file: str | os.PathLike, *, seed: int = 0, **overrides: Any):
        # The tokenizer keeps reading vocab_file when it is saved, so the file must outlive this call.
        tokenizer = ChineseCLIPTokenizer(vocab_file=os.fspath(vocab_file), do_lower_case=True)
        config = tiny_config(tokenizer.vocab_size, **overrides)
        model = seeded_build(seed, lambda: ChineseCLIPDualEncoder(config))
        model.eval()
        return model, tokenizer

    def load_model(self, source: str | os.PathLike) -> ChineseCLIPDualEncoder:
        model = load_pretrained(ChineseCLIPDualEncoder, source, known_names=PRETRAINED_NAMES)
        model.eval()
        return model

    def load_tokenizer(self, source: str | os.PathLike) -> ChineseCLIPTokenizer:
        return load_pretrained(ChineseCLIPTokenizer, source, known_names=PRETRAINED_NAMES)

    def image_processor(self, size: int) -> ChineseCLIPImageProcessor:
        """A paddlenlp processor that preprocesses square images like :meth:`image_transform` (eval)."""
        # Non-square images differ: the processor resizes the short side and centre-crops, while the
        # reference evaluation (and ours) squashes the whole image to size x size.
        return ChineseCLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )

    def save(self, model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, extra_info: dict | None = None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        size = self.image_size(model)
        self.image_processor(size).save_pretrained(str(out_dir))
        max_text_len = int(model.config.text_config.max_position_embeddings)
        self.write_model_info(
            out_dir,
            {
                "image_size": size,
                "embedding_dim": model.embedding_dim,
                "vocab_size": int(model.config.text_config.vocab_size),
                "train_max_len": self.train_max_len,
                "eval_max_len": min(self.eval_max_len, max_text_len),
                "max_text_len": max_text_len,
                "image_mean": list(CLIP_MEAN),
                "image_std": list(CLIP_STD),
                **(extra_info or {}),
            },
        )
        return out_dir

    def image_size(self, model: Any) -> int:
        return int(model.config.vision_config.image_size)

    def image_transform(self, model_or_size: Any, *, train: bool, hflip: bool = True) -> ImageTransform:
        size = model_or_size if isinstance(model_or_size, int) else self.image_size(model_or_size)
        return ImageTransform(image_size=size, train=train, hflip=hflip, mean=CLIP_MEAN, std=CLIP_STD)

    def normalise_text(self, text: str) -> str:
        return str(text).translate(_QUOTES)


FAMILY = register_family(
    ChineseCLIPFamily(
        name="chinese_clip",
        kind=DUAL_ENCODER,
        description="Chinese-CLIP (CLIP ViT-B/16 + Chinese RoBERTa-wwm base, projected to 512-d)",
        default_pretrained=PRETRAINED_NAME,
        supports_recompute=True,
        # The reference fine-tunes and evaluates with a context length of 52 tokens.
        train_max_len=52,
        eval_max_len=52,
        tiny=dict(TINY_ARCHITECTURE),
    )
)
