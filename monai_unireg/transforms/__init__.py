"""MONAI transforms for registration: intensity presets of the methods and pair dictionary transforms."""

from monai_unireg._lazy import lazy_attributes

#: Exported name -> its module, imported on first access (PEP 562; see :mod:`monai_unireg._lazy`).
_EXPORTS = {
    "AUTO_CT_THRESHOLD_HU": ".intensity",
    "CT_WINDOW_PRESETS": ".intensity",
    "CTWindow": ".intensity",
    "CTWindowd": ".intensity",
    "MRIPercentile": ".intensity",
    "MRIPercentiled": ".intensity",
    "RegistrationIntensityd": ".intensity",
    "detect_modality": ".intensity",
    "modality_normaliser": ".intensity",
    "DDF": ".pair",
    "FIXED_IMAGE": ".pair",
    "FIXED_LABEL": ".pair",
    "MOVING_IMAGE": ".pair",
    "MOVING_LABEL": ".pair",
    "ORIGINAL_AFFINE_SUFFIX": ".pair",
    "ORIGINAL_SHAPE_SUFFIX": ".pair",
    "WARPED_IMAGE": ".pair",
    "WARPED_LABEL": ".pair",
    "CheckPaird": ".pair",
    "DDFToGridd": ".pair",
    "ResizeDDF": ".pair",
    "ResizePaird": ".pair",
    "RestoreDDFd": ".pair",
    "WarpImaged": ".pair",
    "WarpLabeld": ".pair",
}
#: Submodules reachable as attributes (``package.module``), as when the package imported them all.
_SUBMODULES = ("functional", "intensity", "pair")

__all__ = [
    "AUTO_CT_THRESHOLD_HU",
    "RegistrationIntensityd",
    "detect_modality",
    "modality_normaliser",
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
    "DDFToGridd",
    "WarpImaged",
    "WarpLabeld",
]

__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS, _SUBMODULES)
