"""CLIP-Chinese BertCLIP: a CLIP ViT image tower and a BERT text tower, trained by LiT-tuning.

The family follows yangjianxin1/CLIP-Chinese (``component/model.py``, ``train_clip.py``):

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
* Initialisation from separate pretrained towers (``init: {vision: ..., text: ...}``): the vision
  transformer (and, from a full CLIP checkpoint, its visual projection, as the seed gets it by
  loading ``BertCLIPModel.from_pretrained(clip_path)``) from a CLIP checkpoint, and the BERT
  tower with its tokenizer from a BERT checkpoint. The text projection starts random.
* The BERT tower can be saved on its own (:func:`save_text_tower`) and reloaded as a plain
  paddlenlp ``BertModel`` with its ``BertTokenizer``, like the seed's ``save_bert_checkpoint.py``.

Pretrained names: the seed uses ``openai/clip-vit-base-patch32`` (known to paddlenlp) and
``Langboat/mengzi-bert-base``, which paddlenlp does not list; the suggested text tower
(:data:`PRETRAINED_TEXT`) is therefore paddlenlp's ``bert-base-chinese``, and mengzi weights can be
given as a local paddle directory.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import Constant
from paddlenlp.transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    PretrainedConfig,
    PretrainedModel,
)
from paddlenlp.transformers.clip.modeling import CLIPVisionTransformer

from ..errors import ConfigError, DownloadError
from .base import (
    DUAL_ENCODER,
    MAX_LOGIT_SCALE,
    DualEncoder,
    DualEncoderOutput,
    ImageTransform,
    ModelFamily,
    check_model_source,
    is_local_source,
    load_pretrained,
    seeded_build,
    tiny_architecture,
)
from .registry import register_family

PRETRAINED_VISION = "openai/clip-vit-base-patch32"
PRETRAINED_TEXT = "bert-base-chinese"
LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07)
VISION_PREFIX = "vision_model."

# OpenAI CLIP's pixel statistics: a pretrained CLIP tower expects inputs normalised with these.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The demo trains from random weights, so the locked image tower is a *random* ViT, and only the
# trainable visual projection adapts the image side: the tower's random features must already tell
# colours, shapes and grid positions apart linearly. 8 px patches keep the positions apart (16 px
# patches reached a mean recall of only 24); a width of 128 learned better, and faster, than
# 256 (mean recall 59.0 against 56.1, both with the demo recipe: 5 epochs, lr 5e-4, 2 ranks;
# about 5 zero-shot). The text tower is as small as ERNIE-ViL's tiny one.
TINY_ARCHITECTURE: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 8,
    "vision_hidden_size": 128,
    "vision_layers": 2,
    "vision_heads": 4,
    "vision_intermediate_size": 512,
    "text_hidden_size": 64,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate_size": 256,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "projection_dim": 64,
    "lock_image_tower": True,
}


class BertCLIPConfig(PretrainedConfig):
    """A BERT text config, a CLIP vision config, the projection width and the LiT switch."""

    model_type = "bert_clip"
    is_composition = True

    def __init__(
        self,
        text_config: Mapping[str, Any] | None = None,
        vision_config: Mapping[str, Any] | None = None,
        projection_dim: int = 512,
        logit_scale_init_value: float = LOGIT_SCALE_INIT,
        lock_image_tower: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        text_config = dict(text_config.to_dict() if isinstance(text_config, PretrainedConfig) else text_config or {})
        vision_config = dict(
            vision_config.to_dict() if isinstance(vision_config, PretrainedConfig) else vision_config or {}
        )
        # A sub-config's model_type is a class attribute; as a keyword it would only be carried along.
        text_config.pop("model_type", None)
        vision_config.pop("model_type", None)
        self.text_config = BertConfig(**text_config)
        self.vision_config = CLIPVisionConfig(**vision_config)
        self.projection_dim = int(projection_dim)
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.lock_image_tower = bool(lock_image_tower)

    def to_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        output = copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in ("text_config", "vision_config")})
        output["text_config"] = self.text_config.to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output


class BertCLIPPretrainedModel(PretrainedModel):
    config_class = BertCLIPConfig
    base_model_prefix = "bert_clip"

    def _init_weights(self, layer: nn.Layer) -> None:
        # The BERT tower initialises itself (BertPretrainedModel); this covers the rest, with CLIP's scheme.
        if isinstance(layer, CLIPVisionTransformer):
            config = layer.config
            width, depth = config.hidden_size, config.num_hidden_layers
            factor = config.initializer_factor
            _normal(layer.class_embedding, width**-0.5 * factor)
            _normal(layer.conv1.weight, config.initializer_range * factor)
            _normal(layer.positional_embedding.weight, config.initializer_range * factor)
            for sub in layer.sublayers():
                if isinstance(sub, nn.TransformerEncoderLayer):
                    attn_std = width**-0.5 * (2 * depth) ** -0.5 * factor
                    for proj in (sub.self_attn.q_proj, sub.self_attn.k_proj, sub.self_attn.v_proj):
                        _normal(proj.weight, attn_std)
                    _normal(sub.self_attn.out_proj.weight, width**-0.5 * factor)
                    _normal(sub.linear1.weight, (2 * width) ** -0.5 * factor)
                    _normal(sub.linear2.weight, attn_std)
                    for linear in (sub.self_attn.q_proj, sub.self_attn.k_proj, sub.self_attn.v_proj,
                                   sub.self_attn.out_proj, sub.linear1, sub.linear2):
                        if linear.bias is not None:
                            linear.bias.set_value(paddle.zeros_like(linear.bias))
        elif isinstance(layer, BertCLIPModel):
            _normal(layer.visual_projection.weight, layer.visual_projection.weight.shape[0] ** -0.5)
            _normal(layer.text_projection.weight, layer.text_projection.weight.shape[0] ** -0.5)


def _normal(param: paddle.Tensor, std: float) -> None:
    param.set_value(paddle.normal(mean=0.0, std=std, shape=param.shape).astype(param.dtype))


class BertCLIPModel(BertCLIPPretrainedModel, DualEncoder):
    """BertCLIP behind the :class:`~vlretrieval.models.base.DualEncoder` interface."""

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

    def logit_scale(self) -> paddle.Tensor:
        return paddle.exp(self.log_logit_scale)

    @paddle.no_grad()
    def clamp_logit_scale_(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        self.log_logit_scale.set_value(paddle.clip(self.log_logit_scale, min=0.0, max=math.log(max_scale)))

    def no_weight_decay_names(self) -> set[str]:
        # Decaying the log-scale would pull the logit scale towards 1, i.e. flatten the softmax.
        return {"log_logit_scale"}

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
            raise ValueError("BertCLIPModel.forward needs both input_ids and pixel_values")
        return DualEncoderOutput(
            image_features=self.encode_images(pixel_values),
            text_features=self.encode_texts(
                input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids
            ),
            logit_scale=self.logit_scale(),
        )


def tiny_config(vocab_size: int, **overrides: Any) -> BertCLIPConfig:
    """The ``tiny`` BertCLIP configuration for a vocabulary of ``vocab_size`` tokens."""
    arch = tiny_architecture("bert_clip", TINY_ARCHITECTURE, overrides)
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
        "projection_dim": arch["projection_dim"],
    }
    return BertCLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=arch["projection_dim"],
        lock_image_tower=arch["lock_image_tower"],
    )


def save_text_tower(model: BertCLIPModel, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Write the BERT tower and its tokenizer so ``BertModel`` / ``BertTokenizer.from_pretrained`` load them.

    The text projection is not part of a plain ``BertModel`` and is left out (as in the seed's
    ``save_bert_checkpoint.py``); the directory is a BERT encoder for any downstream task.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.text_model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


class BertCLIPFamily(ModelFamily):
    """Loading, saving, tokenization and preprocessing of BertCLIP."""

    TOWERS = ("vision", "text")

    def build_tiny(self, vocab_file: str | os.PathLike, *, seed: int = 0, **overrides: Any):
        # The tokenizer keeps reading vocab_file when it is saved, so the file must outlive this call.
        tokenizer = BertTokenizer(vocab_file=os.fspath(vocab_file), do_lower_case=True)
        config = tiny_config(tokenizer.vocab_size, **overrides)
        model = seeded_build(seed, lambda: BertCLIPModel(config))
        model.eval()
        return model, tokenizer

    def load_model(self, source: str | os.PathLike) -> BertCLIPModel:
        """A saved BertCLIP directory (or a BertCLIP published under a name)."""
        model = load_pretrained(BertCLIPModel, source, "BertCLIP model")
        model.eval()
        return model

    def load_tokenizer(self, source: str | os.PathLike) -> BertTokenizer:
        return load_pretrained(BertTokenizer, source, "BERT tokenizer")

    def load_towers(
        self, towers: Mapping[str, str], *, seed: int | None = 0, projection_dim: int = 512,
        lock_image_tower: bool = True,
    ) -> tuple[BertCLIPModel, BertTokenizer]:
        """A BertCLIP assembled from a CLIP checkpoint (``vision``) and a BERT checkpoint (``text``).

        Each is a pretrained name or a local directory. The visual projection comes from the CLIP
        checkpoint when it has one (a full CLIP model), so its width wins over ``projection_dim``;
        otherwise both projections start random (from ``seed``).
        """
        missing = [name for name in self.TOWERS if not towers.get(name)]
        unknown = sorted(set(towers) - set(self.TOWERS))
        if missing or unknown:
            raise ConfigError(
                f"bert_clip init needs exactly the towers {list(self.TOWERS)} (a pretrained name or a local "
                f"directory each); missing {missing}, unknown {unknown}"
            )
        vision_source, text_source = os.fspath(towers["vision"]), os.fspath(towers["text"])
        check_model_source(vision_source)
        try:
            vision_info, _ = CLIPVisionConfig.get_config_dict(vision_source)
        except (OSError, ValueError) as exc:
            if is_local_source(vision_source):
                raise ConfigError(f"{vision_source}: cannot read its CLIP config: {exc}") from exc
            raise DownloadError(
                f"cannot fetch the config of pretrained CLIP {vision_source!r} (no network, or an unknown name); "
                f"download it where the hub is reachable and pass the local directory instead: {exc}"
            ) from exc
        with_projection = vision_info.get("model_type") == "clip" or "CLIPVisionModelWithProjection" in (
            vision_info.get("architectures") or []
        )
        vision = load_pretrained(
            CLIPVisionModelWithProjection if with_projection else CLIPVisionModel, vision_source, "CLIP vision model"
        )
        if isinstance(vision.config.num_hidden_layers, (list, tuple)):
            raise ConfigError(f"{vision_source}: a ResNet CLIP; BertCLIP needs a ViT image tower")
        text = load_pretrained(BertModel, text_source, "BERT model")
        tokenizer = load_pretrained(BertTokenizer, text_source, "BERT tokenizer")
        if with_projection:
            projection_dim = int(vision.vision_projection.shape[1])
        config = BertCLIPConfig(
            text_config=text.config.to_dict(),
            vision_config=vision.config.to_dict(),
            projection_dim=projection_dim,
            lock_image_tower=lock_image_tower,
        )
        model = seeded_build(seed, lambda: BertCLIPModel(config))
        _copy_state(model.vision_model, vision.vision_model, vision_source)
        _copy_state(model.text_model, text, text_source)
        if with_projection:
            model.visual_projection.weight.set_value(vision.vision_projection)
        model.eval()
        return model, tokenizer

    def save(self, model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, extra_info: dict | None = None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        size = self.image_size(model)
        # Lets CLIPImageProcessor.from_pretrained(out_dir) preprocess like our evaluation transform
        # (square images resize identically; non-square ones get a centre crop there).
        CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        ).save_pretrained(str(out_dir))
        max_text_len = int(model.config.text_config.max_position_embeddings)
        self.write_model_info(
            out_dir,
            {
                "image_size": size,
                "embedding_dim": model.embedding_dim,
                "vocab_size": int(model.config.text_config.vocab_size),
                "lock_image_tower": bool(model.image_tower_locked),
                "train_max_len": self.train_max_len,
                "eval_max_len": min(self.eval_max_len, max_text_len),
                "max_text_len": max_text_len,
                **(extra_info or {}),
            },
        )
        return out_dir

    def image_size(self, model: Any) -> int:
        return int(model.config.vision_config.image_size)

    def image_transform(self, model_or_size: Any, *, train: bool, hflip: bool = True) -> ImageTransform:
        size = model_or_size if isinstance(model_or_size, int) else self.image_size(model_or_size)
        return ImageTransform(image_size=size, train=train, hflip=hflip, mean=CLIP_MEAN, std=CLIP_STD)


def _copy_state(target: nn.Layer, source: nn.Layer, where: str) -> None:
    """Copy every parameter of ``source`` into ``target``; any name or shape mismatch is an error."""
    wanted, given = target.state_dict(), source.state_dict()
    missing, unexpected = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
    mismatched = sorted(k for k in set(wanted) & set(given) if list(wanted[k].shape) != list(given[k].shape))
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"{where}: weights do not fit the BertCLIP tower (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {mismatched[:5]})"
        )
    target.set_state_dict(given)


FAMILY = register_family(
    BertCLIPFamily(
        name="bert_clip",
        kind=DUAL_ENCODER,
        description=f"CLIP-Chinese BertCLIP ({PRETRAINED_VISION} + {PRETRAINED_TEXT}, 512-d projections, LiT-tuned)",
        default_pretrained=None,
        supports_recompute=False,
        # The seed trains with max_seq_length 100; training defaults to the tiny position table (64)
        # so a default run never indexes past it, and evaluation is clamped to it when saved.
        train_max_len=64,
        eval_max_len=100,
        tiny=dict(TINY_ARCHITECTURE),
    )
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlretrieval.models.bert_clip --model DIR --out DIR``: the BERT tower as a plain BERT."""
    import argparse

    from ..io import atomic_directory

    parser = argparse.ArgumentParser(prog="python -m vlretrieval.models.bert_clip", description=main.__doc__)
    parser.add_argument("--model", required=True, help="a saved BertCLIP directory, e.g. work/<dataset>/bert_clip/models/finetuned")
    parser.add_argument("--out", type=Path, required=True, help="directory for the BertModel and its tokenizer")
    args = parser.parse_args(argv)
    model = FAMILY.load_model(args.model)
    with atomic_directory(args.out) as tmp:
        save_text_tower(model, FAMILY.load_tokenizer(args.model), tmp)
    print(f"BERT text tower of {args.model} written to {args.out}")
    return 0


if __name__ == "__main__":
    from ..cli import run

    raise SystemExit(run(main))
