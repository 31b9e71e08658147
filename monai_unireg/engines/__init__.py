"""Engines: end-to-end registration of image files (used by the command line and the bundles)."""

from monai_unireg.engines.pair_registration import (
    MODALITIES,
    LoadedPair,
    RegistrationResult,
    detect_modality,
    evaluate_result,
    normalise_intensity,
    read_pair,
    register_files,
    register_pair,
    register_pairs,
    resolve_device,
    write_results,
    write_table,
)

__all__ = [
    "MODALITIES",
    "LoadedPair",
    "RegistrationResult",
    "detect_modality",
    "evaluate_result",
    "normalise_intensity",
    "read_pair",
    "register_files",
    "register_pair",
    "register_pairs",
    "resolve_device",
    "write_results",
    "write_table",
]
