"""Registration metrics: per-label Dice, HD95 in mm, SDlogJ and folding, with ignite handlers.

Conventions (Learn2Reg evaluation): label metrics compare the warped moving labels ``y_pred`` with the fixed
labels ``y`` (integer maps ``[B, 1, *S]``) and give a ``[B, L]`` table per batch; field metrics take the
displacement ``ddf`` ``[B, n, *S]`` in voxels. See each module for the exact definitions.
"""

from monai_unireg.metrics.dice import LabelDiceMetric, LabelMapMetric, label_dice, reduce_label_metric
from monai_unireg.metrics.handlers import HD95, Jacobian, LabelDice
from monai_unireg.metrics.jacobian import JacobianMetric, folding_percentage, sdlogj
from monai_unireg.metrics.surface import HD95Metric, label_hausdorff_distance, spacing_from_affine

__all__ = [
    "LabelMapMetric",
    "LabelDiceMetric",
    "label_dice",
    "reduce_label_metric",
    "HD95Metric",
    "label_hausdorff_distance",
    "spacing_from_affine",
    "JacobianMetric",
    "sdlogj",
    "folding_percentage",
    "LabelDice",
    "HD95",
    "Jacobian",
]
