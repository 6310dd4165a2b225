"""Chinese-CLIP (OFA-Sys): a CLIP ViT image tower and a Chinese RoBERTa text tower (paddlenlp ``ChineseCLIPModel``)."""

from .configuration import PRETRAINED_NAME, PRETRAINED_NAMES, TINY_ARCHITECTURE, tiny_config
from .family import FAMILY, ChineseCLIPFamily
from .modeling import ChineseCLIPDualEncoder

__all__ = [
    "FAMILY", "PRETRAINED_NAME", "PRETRAINED_NAMES", "TINY_ARCHITECTURE", "ChineseCLIPDualEncoder",
    "ChineseCLIPFamily", "tiny_config",
]
