"""ERNIE-ViL 2.0: a ViT image tower and an ERNIE text tower (paddlenlp ``ErnieViLModel``)."""

from .configuration import (
    PRETRAINED_NAME,
    PUBLISHED_ARCHITECTURE,
    PUBLISHED_PARAMETERS,
    TINY_ARCHITECTURE,
    published_config,
    tiny_config,
)
from .family import FAMILY, ErnieViLFamily
from .modeling import ErnieViLDualEncoder

__all__ = [
    "FAMILY", "PRETRAINED_NAME", "PUBLISHED_ARCHITECTURE", "PUBLISHED_PARAMETERS", "TINY_ARCHITECTURE",
    "ErnieViLDualEncoder", "ErnieViLFamily", "published_config", "tiny_config",
]
