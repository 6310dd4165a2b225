"""ERNIE-ViL 2.0: a ViT image tower and an ERNIE text tower (paddlenlp ``ErnieViLModel``)."""

from .configuration import PRETRAINED_NAME, TINY_ARCHITECTURE, tiny_config
from .family import FAMILY, ErnieViLFamily
from .modeling import ErnieViLDualEncoder

__all__ = ["FAMILY", "PRETRAINED_NAME", "TINY_ARCHITECTURE", "ErnieViLDualEncoder", "ErnieViLFamily", "tiny_config"]
