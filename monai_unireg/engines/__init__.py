"""Engines: end-to-end registration of image files (used by the command line and the bundles); the training loop
shared by the learned methods, their objectives, fine-tuning and instance optimisation; the workflows of the
uniGradICON, SACB-Net, PromptReg and UniReg bundles and the pieces they share (``workflows``)."""

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
    "DomainPairLoader": ".promptreg",
    "PromptRegObjective": ".promptreg",
    "train_promptreg": ".promptreg",
    "evaluate_datasets": ".promptreg_workflows",
    "SACBNET_CT_WINDOW": ".sacbnet",
    "SACBNET_DEFAULTS": ".sacbnet",
    "SACBNET_LAMBDAS": ".sacbnet",
    "SACBNetObjective": ".sacbnet",
    "train_sacbnet": ".sacbnet",
    "CT_WINDOW": ".training",
    "LossTerms": ".training",
    "PairLoader": ".training",
    "polynomial_decay": ".training",
    "train_registration": ".training",
    "validation_dice": ".training",
    "UNIGRADICON_DEFAULTS": ".unigradicon",
    "GradICONObjective": ".unigradicon",
    "InstanceOptimised": ".unigradicon",
    "RandomPairAugmentation": ".unigradicon",
    "instance_optimise": ".unigradicon",
    "stage_two_from_stage_one": ".unigradicon",
    "train_unigradicon": ".unigradicon",
    "train_workflow": ".unigradicon_workflows",
    "UNIREG_CT_WINDOW": ".unireg",
    "UNIREG_DEFAULTS": ".unireg",
    "UNIREG_INTENSITY_RANGE": ".unireg",
    "UNIREG_LAMBDAS": ".unireg",
    "UniRegObjective": ".unireg",
    "UniRegPairLoader": ".unireg",
    "train_unireg": ".unireg",
    "build_unireg": ".unireg_workflows",
    "evaluate_unireg": ".unireg_workflows",
    "unireg_registration": ".unireg_workflows",
    "DistributedRun": ".workflows",
    "check_datasets": ".workflows",
    "check_resumable": ".workflows",
    "distributed_training": ".workflows",
    "load_validation_pairs": ".workflows",
    "size_text": ".workflows",
    "validation_set": ".workflows",
    "working_size": ".workflows",
    "wrap_distributed": ".workflows",
    "write_result_table": ".workflows",
}
#: Exported under another name than in its module: name -> (module, name there).
_RENAMED = {
    "train_promptreg_workflow": (".promptreg_workflows", "train_workflow"),
    "train_unireg_workflow": (".unireg_workflows", "train_workflow"),
}
#: Submodules reachable as attributes (bundle configs name ``$monai_unireg.engines.bundle.X``).
_SUBMODULES = (
    "bundle",
    "defaults",
    "instance_optimisation",
    "pair_registration",
    "promptreg",
    "promptreg_workflows",
    "refinement",
    "sacbnet",
    "training",
    "unigradicon",
    "unigradicon_workflows",
    "unireg",
    "unireg_workflows",
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
    elif name in _RENAMED:
        module, original = _RENAMED[name]
        value = getattr(importlib.import_module(module, __name__), original)
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
    "UniRegPairLoader",
    "train_unireg",
    "build_unireg",
    "evaluate_unireg",
    "train_unireg_workflow",
    "unireg_registration",
    "DomainPairLoader",
    "PromptRegObjective",
    "train_promptreg",
    "evaluate_datasets",
    "train_promptreg_workflow",
    "CT_WINDOW",
    "LossTerms",
    "PairLoader",
    "polynomial_decay",
    "train_registration",
    "validation_dice",
    "SACBNET_CT_WINDOW",
    "SACBNET_LAMBDAS",
    "SACBNetObjective",
    "train_sacbnet",
    "GradICONObjective",
    "InstanceOptimised",
    "RandomPairAugmentation",
    "instance_optimise",
    "stage_two_from_stage_one",
    "train_unigradicon",
    "train_workflow",
    "DistributedRun",
    "check_datasets",
    "check_resumable",
    "size_text",
    "working_size",
    "write_result_table",
    "distributed_training",
    "load_validation_pairs",
    "validation_set",
    "wrap_distributed",
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
