"""MONAI transforms for registration: intensity presets of the methods and pair dictionary transforms."""

from monai_unireg.transforms.intensity import CT_WINDOW_PRESETS, CTWindow, CTWindowd, MRIPercentile, MRIPercentiled
from monai_unireg.transforms.pair import (
    DDF,
    FIXED_IMAGE,
    FIXED_LABEL,
    MOVING_IMAGE,
    MOVING_LABEL,
    ORIGINAL_AFFINE_SUFFIX,
    ORIGINAL_SHAPE_SUFFIX,
    WARPED_IMAGE,
    WARPED_LABEL,
    CheckPaird,
    ResizeDDF,
    ResizePaird,
    RestoreDDFd,
    WarpImaged,
    WarpLabeld,
)

__all__ = [
    "CT_WINDOW_PRESETS",
    "CTWindow",
    "CTWindowd",
    "MRIPercentile",
    "MRIPercentiled",
    "DDF",
    "FIXED_IMAGE",
    "FIXED_LABEL",
    "MOVING_IMAGE",
    "MOVING_LABEL",
    "ORIGINAL_AFFINE_SUFFIX",
    "ORIGINAL_SHAPE_SUFFIX",
    "WARPED_IMAGE",
    "WARPED_LABEL",
    "CheckPaird",
    "ResizeDDF",
    "ResizePaird",
    "RestoreDDFd",
    "WarpImaged",
    "WarpLabeld",
]
