"""Registration metrics: per-label Dice, HD95 in mm, SDlogJ and folding, with ignite handlers.

Conventions (Learn2Reg evaluation): label metrics compare the warped moving labels ``y_pred`` with the fixed
labels ``y`` (integer maps ``[B, 1, *S]``) and give a ``[B, L]`` table per batch; field metrics take the
displacement ``ddf`` ``[B, n, *S]`` in voxels. See each module for the exact definitions.
"""

from monai_unireg._lazy import lazy_attributes

#: Exported name -> its module, imported on first access (PEP 562; see :mod:`monai_unireg._lazy`).
_EXPORTS = {
    "LabelDiceMetric": ".dice",
    "LabelMapMetric": ".dice",
    "label_dice": ".labels",
    "reduce_label_metric": ".labels",
    "HD95": ".handlers",
    "Jacobian": ".handlers",
    "LabelDice": ".handlers",
    "JacobianMetric": ".jacobian",
    "jacobian_statistics": ".field",
    "folding_percentage": ".jacobian",
    "sdlogj": ".jacobian",
    "HD95Metric": ".surface",
    "label_hausdorff_distance": ".hausdorff",
    "spacing_from_affine": ".surface",
}
#: Submodules reachable as attributes (``package.module``), as when the package imported them all.
_SUBMODULES = ("dice", "field", "handlers", "hausdorff", "jacobian", "labels", "surface")

__all__ = [
    "LabelMapMetric",
    "LabelDiceMetric",
    "label_dice",
    "reduce_label_metric",
    "HD95Metric",
    "label_hausdorff_distance",
    "spacing_from_affine",
    "JacobianMetric",
    "jacobian_statistics",
    "sdlogj",
    "folding_percentage",
    "LabelDice",
    "HD95",
    "Jacobian",
]

__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS, _SUBMODULES)
