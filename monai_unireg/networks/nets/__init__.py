"""Networks: registration networks (``forward(moving, fixed, **conditions) -> ddf`` ``[B, 3, D, H, W]`` in
voxels) and the feature extractors they can use (``forward(image) -> features`` ``[B, C, D, H, W]``)."""

from monai_unireg._lazy import lazy_attributes

#: Exported name -> its module, imported on first access (PEP 562; see :mod:`monai_unireg._lazy`).
_EXPORTS = {
    "PairInput": ".pair_input",
    "PromptReg": ".promptreg",
    "PromptRegOutput": ".promptreg",
    "RDPNet": ".promptreg",
    "load_promptreg": ".promptreg",
    "ResizedRegistration": ".resized",
    "SACBNET_CHANNELS": ".sacbnet",
    "SACBNet": ".sacbnet",
    "load_sacbnet": ".sacbnet",
    "GradICONUNet": ".unigradicon",
    "UniGradICON": ".unigradicon",
    "load_unigradicon": ".unigradicon",
    "load_unigradicon_weights": ".unigradicon",
    "published_key_prefixes": ".unigradicon",
    "DEFAULT_TASK_ALIASES": ".unireg",
    "DEFAULT_TASKS": ".unireg",
    "REGISTRATION_TYPES": ".unireg",
    "ConditionedUniReg": ".unireg",
    "UniReg": ".unireg",
    "UniRegBackbone": ".unireg",
    "load_unireg": ".unireg",
    "UniversalModelFeatures": ".universal_model",
    "load_universal_model_checkpoint": ".universal_model",
    "map_universal_model_keys": ".universal_model",
    "VoxelOpt": ".voxelopt",
}
#: Submodules reachable as attributes (``package.module``), as when the package imported them all.
_SUBMODULES = ("pair_input", "promptreg", "resized", "sacbnet", "unigradicon", "unireg", "universal_model", "voxelopt")

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

__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS, _SUBMODULES)
