"""Networks: registration networks (``forward(moving, fixed, **conditions) -> ddf`` ``[B, 3, D, H, W]`` in
voxels) and the feature extractors they can use (``forward(image) -> features`` ``[B, C, D, H, W]``)."""

from monai_unireg.networks.nets.pair_input import PairInput
from monai_unireg.networks.nets.promptreg import PromptReg, PromptRegOutput, RDPNet, load_promptreg
from monai_unireg.networks.nets.resized import ResizedRegistration
from monai_unireg.networks.nets.sacbnet import SACBNET_CHANNELS, SACBNet, load_sacbnet
from monai_unireg.networks.nets.unigradicon import (
    GradICONUNet,
    UniGradICON,
    load_unigradicon,
    load_unigradicon_weights,
    published_key_prefixes,
)
from monai_unireg.networks.nets.unireg import (
    DEFAULT_TASK_ALIASES,
    DEFAULT_TASKS,
    REGISTRATION_TYPES,
    ConditionedUniReg,
    UniReg,
    UniRegBackbone,
    load_unireg,
)
from monai_unireg.networks.nets.universal_model import (
    UniversalModelFeatures,
    load_universal_model_checkpoint,
    map_universal_model_keys,
)
from monai_unireg.networks.nets.voxelopt import VoxelOpt

__all__ = [
    "ConditionedUniReg",
    "DEFAULT_TASKS",
    "DEFAULT_TASK_ALIASES",
    "REGISTRATION_TYPES",
    "UniReg",
    "UniRegBackbone",
    "load_unireg",
    "GradICONUNet",
    "PairInput",
    "PromptReg",
    "PromptRegOutput",
    "RDPNet",
    "ResizedRegistration",
    "SACBNET_CHANNELS",
    "SACBNet",
    "UniGradICON",
    "UniversalModelFeatures",
    "VoxelOpt",
    "load_unigradicon",
    "load_unigradicon_weights",
    "load_promptreg",
    "load_sacbnet",
    "load_universal_model_checkpoint",
    "map_universal_model_keys",
    "published_key_prefixes",
]
