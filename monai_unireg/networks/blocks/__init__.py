"""Building blocks shared by the registration networks."""

from monai_unireg._lazy import lazy_attributes

#: Exported name -> its module, imported on first access (PEP 562; see :mod:`monai_unireg._lazy`).
_EXPORTS = {
    "adaptive_gaussian_filter": ".adaptive_filter",
    "NEIGHBOUR_OFFSETS": ".cost_volume",
    "neighbour_cost_volume": ".cost_volume",
    "offsets_to_field": ".cost_volume",
    "tied_argmin_field": ".cost_volume",
    "DynamicDeformationHead": ".dynamic_head",
    "head_parameter_count": ".dynamic_head",
    "kmeans": ".kmeans",
    "ConvInsBlock": ".prompt",
    "PromptOutput": ".prompt",
    "RegistrationPromptGenerator": ".prompt",
    "SpatialAwareConvBlock": ".sacb",
    "conv_norm_act": ".sacb",
    "soft_matching_flow": ".sacb",
}
#: Submodules reachable as attributes (``package.module``), as when the package imported them all.
_SUBMODULES = ("adaptive_filter", "cost_volume", "dynamic_head", "kmeans", "prompt", "sacb")

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

__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS, _SUBMODULES)
