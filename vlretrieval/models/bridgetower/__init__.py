"""BridgeTower (Xu et al., AAAI 2023) as a cross encoder: ITM scoring plus its ITC heads, in paddle."""

from .configuration import ITC_DIM, LOGIT_SCALE_INIT, TINY_ARCHITECTURE, BridgeTowerConfig, tiny_config
from .convert import (
    ConversionError,
    ConversionReport,
    config_from_hf,
    convert_bridgetower_checkpoint,
    convert_state_dict,
    hf_to_ours,
    main,
)
from .family import FAMILY, POSITION_TABLE, BridgeTowerCollator, BridgeTowerFamily, resample_position_table
from .modeling import (
    BridgeTowerForRetrieval,
    BridgeTowerPretrainedModel,
    BridgeTowerTrainingOutput,
    sample_hard_negatives,
)
from .scoring import BridgeTowerPairScorer

__all__ = [
    "FAMILY", "ITC_DIM", "LOGIT_SCALE_INIT", "POSITION_TABLE", "TINY_ARCHITECTURE", "BridgeTowerCollator",
    "BridgeTowerConfig", "BridgeTowerFamily", "BridgeTowerForRetrieval", "BridgeTowerPairScorer",
    "BridgeTowerPretrainedModel", "BridgeTowerTrainingOutput", "ConversionError", "ConversionReport",
    "config_from_hf", "convert_bridgetower_checkpoint", "convert_state_dict", "hf_to_ours", "main",
    "resample_position_table", "sample_hard_negatives", "tiny_config",
]
