"""Engines: end-to-end registration of image files (used by the command line and the bundles); each learned
method's defaults, training objective, fine-tuning and instance optimisation; the pieces the bundles' configs wire
into MONAI's engines (``bundle``) and the helpers they share (``workflows``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from monai_unireg._lazy import lazy_attributes

if TYPE_CHECKING:
    from monai_unireg.engines.defaults import MethodDefaults

#: Exported name -> its module, imported on first access (PEP 562; see :mod:`monai_unireg._lazy`): the command line
#: imports ``pair_registration`` without the trainers, workflows and bundle helpers (and MONAI through them).
_EXPORTS = {
    "VOXELOPT_DEFAULTS": ".defaults",
    "MethodDefaults": ".defaults",
    "FieldOptimised": ".instance_optimisation",
    "optimise_field": ".instance_optimisation",
    "MODALITIES": ".pair_registration",
    "LoadedPair": ".pair_registration",
    "RegistrationResult": ".pair_registration",
    "detect_modality": ".pair_registration",
    "evaluate_result": ".pair_registration",
    "normalise_intensity": ".pair_registration",
    "read_pair": ".pair_registration",
    "read_volume": ".pair_registration",
    "register_files": ".pair_registration",
    "register_pair": ".pair_registration",
    "register_pairs": ".pair_registration",
    "resolve_device": ".pair_registration",
    "write_results": ".pair_registration",
    "write_table": ".pair_registration",
    "PROMPTREG_DEFAULTS": ".promptreg",
    "DatasetDiceTable": ".promptreg",
    "PromptRegObjective": ".promptreg",
    "SACBNET_CT_WINDOW": ".sacbnet",
    "SACBNET_DEFAULTS": ".sacbnet",
    "SACBNET_LAMBDAS": ".sacbnet",
    "SACBNetObjective": ".sacbnet",
    "LossTerms": ".training",
    "UNIGRADICON_DEFAULTS": ".unigradicon",
    "GradICONObjective": ".unigradicon",
    "InstanceOptimised": ".unigradicon",
    "RandomPairAugmentationd": ".unigradicon",
    "StartingWeights": ".unigradicon",
    "check_starting_weights": ".unigradicon",
    "instance_optimise": ".unigradicon",
    "stage_two_from_stage_one": ".unigradicon",
    "UNIREG_CT_WINDOW": ".unireg",
    "UNIREG_DEFAULTS": ".unireg",
    "UNIREG_INTENSITY_RANGE": ".unireg",
    "UNIREG_LAMBDAS": ".unireg",
    "EvaluationLabelsd": ".unireg",
    "UniRegConditiond": ".unireg",
    "UniRegObjective": ".unireg",
    "UniRegRegistration": ".unireg",
    "UniRegTable": ".unireg",
    "prepare_conditioned_batch": ".unireg",
    "prepare_unireg_batch": ".unireg",
    "unireg_objective": ".unireg",
    "unireg_pairs": ".unireg",
    "unireg_registration": ".unireg",
    "validation_label_values": ".unireg",
    "check_datasets": ".workflows",
    "load_validation_pairs": ".workflows",
    "write_result_table": ".workflows",
}
#: Submodules reachable as attributes (bundle configs name ``$monai_unireg.engines.bundle.X``).
_SUBMODULES = (
    "bundle",
    "defaults",
    "instance_optimisation",
    "pair_registration",
    "promptreg",
    "refinement",
    "sacbnet",
    "training",
    "unigradicon",
    "unireg",
    "workflows",
)
#: Method name -> (module, attribute) of its :class:`MethodDefaults`: one method's defaults without the others'.
_DEFAULTS_HOMES = {
    "voxelopt": (".defaults", "VOXELOPT_DEFAULTS"),
    "unigradicon": (".unigradicon", "UNIGRADICON_DEFAULTS"),
    "sacbnet": (".sacbnet", "SACBNET_DEFAULTS"),
    "promptreg": (".promptreg", "PROMPTREG_DEFAULTS"),
    "unireg": (".unireg", "UNIREG_DEFAULTS"),
}


def method_defaults(method: str) -> MethodDefaults:
    """The :class:`~monai_unireg.engines.defaults.MethodDefaults` of ``method`` (a key of :data:`METHOD_DEFAULTS`),
    importing only that method's module."""
    if method not in _DEFAULTS_HOMES:
        raise ValueError(f"method must be one of {', '.join(_DEFAULTS_HOMES)}, got {method!r}.")
    module, name = _DEFAULTS_HOMES[method]
    return getattr(importlib.import_module(module, __name__), name)


_lazy_getattr, __dir__ = lazy_attributes(globals(), _EXPORTS, _SUBMODULES)


def __getattr__(name: str) -> Any:
    if name == "METHOD_DEFAULTS":  # method name -> its defaults (working size, CT window, weights loader, ...)
        value: Any = {method: method_defaults(method) for method in _DEFAULTS_HOMES}
    else:
        return _lazy_getattr(name)
    globals()[name] = value
    return value


__all__ = [
    "method_defaults",
    "METHOD_DEFAULTS",
    "MethodDefaults",
    "VOXELOPT_DEFAULTS",
    "SACBNET_DEFAULTS",
    "UNIGRADICON_DEFAULTS",
    "PROMPTREG_DEFAULTS",
    "UNIREG_DEFAULTS",
    "FieldOptimised",
    "optimise_field",
    "UNIREG_CT_WINDOW",
    "UNIREG_INTENSITY_RANGE",
    "UNIREG_LAMBDAS",
    "UniRegObjective",
    "EvaluationLabelsd",
    "UniRegConditiond",
    "UniRegRegistration",
    "UniRegTable",
    "prepare_conditioned_batch",
    "prepare_unireg_batch",
    "unireg_objective",
    "unireg_pairs",
    "unireg_registration",
    "validation_label_values",
    "PromptRegObjective",
    "DatasetDiceTable",
    "LossTerms",
    "SACBNET_CT_WINDOW",
    "SACBNET_LAMBDAS",
    "SACBNetObjective",
    "GradICONObjective",
    "InstanceOptimised",
    "RandomPairAugmentationd",
    "StartingWeights",
    "check_starting_weights",
    "instance_optimise",
    "stage_two_from_stage_one",
    "check_datasets",
    "write_result_table",
    "load_validation_pairs",
    "MODALITIES",
    "LoadedPair",
    "RegistrationResult",
    "detect_modality",
    "evaluate_result",
    "normalise_intensity",
    "read_pair",
    "read_volume",
    "register_files",
    "register_pair",
    "register_pairs",
    "resolve_device",
    "write_results",
    "write_table",
]
