"""The BertCLIP family: its classes, assembly from separately pretrained towers, and what its saved
directories record.

Initialisation from separate pretrained towers (``init: {vision: ..., text: ...}``): the vision
transformer (and, from a full CLIP checkpoint, its visual projection, as the seed gets it by
loading ``BertCLIPModel.from_pretrained(clip_path)``) from a CLIP checkpoint, and the BERT tower
with its tokenizer from a BERT checkpoint. The text projection starts random.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import paddle.nn as nn
from paddlenlp.transformers import (
    BertModel,
    BertTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from ...errors import ConfigError, DownloadError
from ..base import (
    CLIP_MEAN,
    CLIP_STD,
    ModelFamily,
    check_model_source,
    is_local_source,
    load_pretrained,
    seeded_build,
)
from ..registry import register_family
from .configuration import (
    PRETRAINED_TEXT,
    PRETRAINED_VISION,
    TINY_ARCHITECTURE,
    BertCLIPConfig,
    published_config,
    tiny_config,
)
from .modeling import BertCLIPModel


class BertCLIPFamily(ModelFamily):
    """Loading, saving, tokenization and preprocessing of BertCLIP."""

    model_class = BertCLIPModel
    tokenizer_class = BertTokenizer
    image_processor_class = CLIPImageProcessor
    image_mean = CLIP_MEAN
    image_std = CLIP_STD

    TOWERS = ("vision", "text")

    def tiny_config(self, tokenizer: Any, **overrides: Any) -> BertCLIPConfig:
        return tiny_config(tokenizer.vocab_size, **overrides)

    def published_config(self, tokenizer: Any) -> BertCLIPConfig:
        return published_config(tokenizer.vocab_size)

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

    def model_info(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        return {**super().model_info(model, tokenizer), "lock_image_tower": bool(model.image_tower_locked)}


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
