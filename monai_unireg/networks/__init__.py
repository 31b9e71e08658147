"""Registration networks and their building blocks."""

from monai_unireg.networks import blocks, nets

__all__ = ["blocks", "nets"]
