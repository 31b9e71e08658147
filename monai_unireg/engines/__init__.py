"""Engines: end-to-end registration of image files (used by the command line and the bundles); the training loop
shared by the learned methods, their objectives, fine-tuning and instance optimisation; the workflows of the
uniGradICON bundle."""

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
from monai_unireg.engines.sacbnet import (
    SACBNET_CT_WINDOW,
    SACBNET_LAMBDAS,
    SACBNetObjective,
    diffusion_regularisation,
    soft_dice_loss,
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
    GradICONObjective,
    InstanceOptimised,
    RandomPairAugmentation,
    instance_optimise,
    stage_two_from_stage_one,
    train_unigradicon,
)
from monai_unireg.engines.unigradicon_workflows import (
    build_unigradicon,
    load_validation_pairs,
    train_workflow,
)

__all__ = [
    "CT_WINDOW",
    "LossTerms",
    "PairLoader",
    "polynomial_decay",
    "train_registration",
    "validation_dice",
    "SACBNET_CT_WINDOW",
    "SACBNET_LAMBDAS",
    "SACBNetObjective",
    "diffusion_regularisation",
    "soft_dice_loss",
    "train_sacbnet",
    "GradICONObjective",
    "InstanceOptimised",
    "RandomPairAugmentation",
    "instance_optimise",
    "stage_two_from_stage_one",
    "train_unigradicon",
    "build_unigradicon",
    "train_workflow",
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
