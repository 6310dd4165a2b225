"""CLIP-Chinese BertCLIP: a CLIP ViT image tower and a BERT text tower, trained by LiT-tuning."""

from .configuration import (
    LOGIT_SCALE_INIT,
    PRETRAINED_TEXT,
    PRETRAINED_VISION,
    TINY_ARCHITECTURE,
    BertCLIPConfig,
    tiny_config,
)
from .convert import main, save_text_tower
from .family import FAMILY, BertCLIPFamily
from .modeling import BertCLIPModel, BertCLIPPretrainedModel

__all__ = [
    "FAMILY", "LOGIT_SCALE_INIT", "PRETRAINED_TEXT", "PRETRAINED_VISION", "TINY_ARCHITECTURE", "BertCLIPConfig",
    "BertCLIPFamily", "BertCLIPModel", "BertCLIPPretrainedModel", "main", "save_text_tower", "tiny_config",
]
