"""Building blocks shared by the registration networks."""

from monai_unireg.networks.blocks.adaptive_filter import adaptive_gaussian_filter
from monai_unireg.networks.blocks.cost_volume import (
    NEIGHBOUR_OFFSETS,
    neighbour_cost_volume,
    offsets_to_field,
    tied_argmin_field,
)
from monai_unireg.networks.blocks.dynamic_head import DynamicDeformationHead, head_parameter_count
from monai_unireg.networks.blocks.kmeans import kmeans
from monai_unireg.networks.blocks.prompt import ConvInsBlock, PromptOutput, RegistrationPromptGenerator
from monai_unireg.networks.blocks.sacb import SpatialAwareConvBlock, conv_norm_act, soft_matching_flow

__all__ = [
    "DynamicDeformationHead",
    "head_parameter_count",
    "ConvInsBlock",
    "NEIGHBOUR_OFFSETS",
    "PromptOutput",
    "RegistrationPromptGenerator",
    "SpatialAwareConvBlock",
    "adaptive_gaussian_filter",
    "conv_norm_act",
    "kmeans",
    "neighbour_cost_volume",
    "offsets_to_field",
    "tied_argmin_field",
    "soft_matching_flow",
]
