"""Building blocks shared by the registration networks."""

from monai_unireg.networks.blocks.adaptive_filter import adaptive_gaussian_filter
from monai_unireg.networks.blocks.cost_volume import NEIGHBOUR_OFFSETS, neighbour_cost_volume, offsets_to_field

__all__ = ["NEIGHBOUR_OFFSETS", "adaptive_gaussian_filter", "neighbour_cost_volume", "offsets_to_field"]
