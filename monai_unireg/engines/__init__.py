"""Engines: end-to-end registration of image files (used by the command line and the bundles); each learned
method's defaults, training objective, fine-tuning and instance optimisation; the pieces the bundles' configs wire
into MONAI's engines (``bundle``) and the helpers they share (``workflows``)."""

# submodules the bundle configs name as attributes ($monai_unireg.engines.bundle.X)
from monai_unireg.engines import bundle as bundle
from monai_unireg.engines import promptreg as promptreg
from monai_unireg.engines import refinement as refinement
from monai_unireg.engines.defaults import VOXELOPT_DEFAULTS, MethodDefaults
from monai_unireg.engines.instance_optimisation import FieldOptimised, optimise_field
from monai_unireg.engines.pair_registration import (
    MODALITIES,
    LoadedPair,
    RegistrationResult,
    detect_modality,
    evaluate_result,
    normalise_intensity,
    read_pair,
    read_volume,
    register_files,
    register_pair,
    register_pairs,
    resolve_device,
    write_results,
    write_table,
)
from monai_unireg.engines.promptreg import PROMPTREG_DEFAULTS, DatasetDiceTable, PromptRegObjective
from monai_unireg.engines.sacbnet import (
    SACBNET_CT_WINDOW,
    SACBNET_DEFAULTS,
    SACBNET_LAMBDAS,
    SACBNetObjective,
)
from monai_unireg.engines.training import LossTerms
from monai_unireg.engines.unigradicon import (
    UNIGRADICON_DEFAULTS,
    GradICONObjective,
    InstanceOptimised,
    RandomPairAugmentationd,
    StartingWeights,
    check_starting_weights,
    instance_optimise,
    stage_two_from_stage_one,
)
from monai_unireg.engines.unireg import (
    UNIREG_CT_WINDOW,
    UNIREG_DEFAULTS,
    UNIREG_INTENSITY_RANGE,
    UNIREG_LAMBDAS,
    EvaluationLabelsd,
    UniRegConditiond,
    UniRegObjective,
    UniRegRegistration,
    UniRegTable,
    prepare_conditioned_batch,
    prepare_unireg_batch,
    unireg_objective,
    unireg_pairs,
    unireg_registration,
    validation_label_values,
)
from monai_unireg.engines.workflows import check_datasets, load_validation_pairs, write_result_table

#: Method name -> its defaults (working size, CT window, intensity range, weights loader, instance optimisation).
METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    defaults.name: defaults
    for defaults in (VOXELOPT_DEFAULTS, UNIGRADICON_DEFAULTS, SACBNET_DEFAULTS, PROMPTREG_DEFAULTS, UNIREG_DEFAULTS)
}

__all__ = [
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
