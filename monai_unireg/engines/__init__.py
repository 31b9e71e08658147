"""Engines: end-to-end registration of image files (used by the command line and the bundles); the training loop
shared by the learned methods, their objectives, fine-tuning and instance optimisation; the workflows of the
uniGradICON and UniReg bundles and the pieces they share (``workflows``)."""

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
from monai_unireg.engines.promptreg import (
    PROMPTREG_DEFAULTS,
    DatasetDiceTable,
    DomainPairLoader,
    PromptRegObjective,
    train_promptreg,
)
from monai_unireg.engines.sacbnet import (
    SACBNET_CT_WINDOW,
    SACBNET_DEFAULTS,
    SACBNET_LAMBDAS,
    SACBNetObjective,
    train_sacbnet,
)
from monai_unireg.engines.training import (
    CT_WINDOW,
    LossTerms,
    PairLoader,
    polynomial_decay,
    train_registration,
    validation_dice,
)
from monai_unireg.engines.unigradicon import (
    UNIGRADICON_DEFAULTS,
    GradICONObjective,
    InstanceOptimised,
    RandomPairAugmentation,
    instance_optimise,
    stage_two_from_stage_one,
    train_unigradicon,
)
from monai_unireg.engines.unigradicon_workflows import train_workflow
from monai_unireg.engines.unireg import (
    UNIREG_CT_WINDOW,
    UNIREG_DEFAULTS,
    UNIREG_INTENSITY_RANGE,
    UNIREG_LAMBDAS,
    UniRegObjective,
    UniRegPairLoader,
    train_unireg,
)
from monai_unireg.engines.unireg_workflows import build_unireg, evaluate_unireg, unireg_registration
from monai_unireg.engines.unireg_workflows import train_workflow as train_unireg_workflow
from monai_unireg.engines.workflows import (
    DistributedRun,
    check_datasets,
    check_resumable,
    distributed_training,
    load_validation_pairs,
    size_text,
    validation_set,
    working_size,
    wrap_distributed,
    write_result_table,
)

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
    "UniRegPairLoader",
    "train_unireg",
    "build_unireg",
    "evaluate_unireg",
    "train_unireg_workflow",
    "unireg_registration",
    "DomainPairLoader",
    "PromptRegObjective",
    "train_promptreg",
    "DatasetDiceTable",
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
