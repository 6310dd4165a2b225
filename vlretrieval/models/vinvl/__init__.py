"""VinVL (Oscar+) cross-encoder: BERT over caption, detector tags and region features."""

from .configuration import (
    DEFAULT_MAX_LEN,
    DEFAULT_MAX_REGIONS,
    FEATURE_DIM,
    TINY_ARCHITECTURE,
    OscarConfig,
    tiny_config,
)
from .convert import (
    ConversionReport,
    convert_oscar_checkpoint,
    convert_oscar_state,
    main,
    oscar_config_from_json,
    torch_name_map,
)
from .data import RegionPairCollator, RegionPairDataset
from .family import FAMILY, FAMILY_NAME, VinVLFamily
from .modeling import ITMOutput, OscarForImageTextMatching, OscarMaskedTokenHead, OscarPretrainedModel
from .pretraining import PRETRAIN_DEFAULTS, mask_tokens, masked_token_pretraining, resolve_pretrain_settings
from .scoring import RegionPairScorer

__all__ = [
    "DEFAULT_MAX_LEN", "DEFAULT_MAX_REGIONS", "FAMILY", "FAMILY_NAME", "FEATURE_DIM", "PRETRAIN_DEFAULTS",
    "TINY_ARCHITECTURE", "ConversionReport", "ITMOutput", "OscarConfig", "OscarForImageTextMatching",
    "OscarMaskedTokenHead", "OscarPretrainedModel", "RegionPairCollator", "RegionPairDataset", "RegionPairScorer",
    "VinVLFamily", "convert_oscar_checkpoint", "convert_oscar_state", "main", "mask_tokens",
    "masked_token_pretraining", "oscar_config_from_json", "resolve_pretrain_settings", "tiny_config",
    "torch_name_map",
]
