"""Regularity of a displacement field: SDlogJ (standard deviation of the log Jacobian determinant) and folding.

Both come from the Jacobian determinant ``J(x) = det(I + grad u(x))`` of ``phi(x) = x + u(x)``
(:func:`monai_unireg.spatial.jacobian_determinant`, ``u`` in voxels, central differences).

The Learn2Reg evaluation (Hering et al., IEEE TMI 2023; https://github.com/MDL-UzL/L2R/tree/main/evaluation)
takes central differences of ``u`` with the kernel ``[-0.5, 0, 0.5]`` and zero padding, crops 2 voxels at every
border, and reports ``std(log(clip(J + 3, 1e-9, 1e9)))`` -- note the "+ 3", which keeps folded voxels finite
and compresses the scale. Cropping 2 voxels removes exactly the voxels where zero padding and ``torch.gradient``'s
one-sided border differences disagree, so with the default ``crop=2`` the values here equal that code's.

Definitions (over the voxels left after cropping ``crop`` voxels at every border, default 2; the standard
deviation is the population one, ``ddof = 0``, like ``numpy.std``):

- ``mode="l2r"`` (default, comparable with published tables): ``SDlogJ = std(log(clip(J + 3, 1e-9, 1e9)))``.
- ``mode="exact"``: ``SDlogJ = std(log J)`` over the voxels with ``J > 0`` only (NaN if there are none).
- folding: ``100 * mean(J <= 0)``, the percentage of voxels with a non-positive determinant.

Say which SDlogJ mode a report uses.
"""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric

from monai_unireg.metrics.field import (
    _JACOBIAN_REDUCTIONS,
    JACOBIAN_KEYS,
    SDLOGJ_MODES,
    _check_crop,
    cropped_determinant,
    folding_percentage,
    jacobian_statistics,
    sdlogj,
)
from monai_unireg.validation import check_option

__all__ = ["JacobianMetric", "sdlogj", "folding_percentage", "cropped_determinant", "SDLOGJ_MODES", "JACOBIAN_KEYS"]


class JacobianMetric(CumulativeIterationMetric):
    """SDlogJ and folding percentage of displacement fields, accumulated over batches.

    Calling the metric on ``ddf`` (``[B, n, *S]`` in voxels, or a list of ``[n, *S]``) returns float32
    ``[B, 2]``: column 0 SDlogJ, column 1 the percentage of folded voxels (order of :data:`JACOBIAN_KEYS`),
    and buffers it. Definitions in the module docstring; the Jacobian determinant is computed once per call.

    Args:
        mode: SDlogJ definition, ``"l2r"`` (default, Learn2Reg "+3" convention) or ``"exact"``.
        crop: voxels removed at every border before both statistics (Learn2Reg: 2).
        reduction: default of :meth:`aggregate`: ``"mean"`` (mean over all fields seen) or ``"none"``.

    Example::

        metric = JacobianMetric()
        for ddf in fields:
            metric(ddf)
        metric.aggregate()  # {"sdlogj": tensor(0.07), "folding_percent": tensor(0.01)}
    """

    def __init__(self, mode: str = "l2r", crop: int = 2, reduction: str = "mean") -> None:
        super().__init__()
        self.mode = check_option(mode, "mode", SDLOGJ_MODES)
        self.crop = _check_crop(crop, ())
        self.reduction = check_option(reduction, "reduction", _JACOBIAN_REDUCTIONS)

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``y_pred`` is the displacement field ``[B, n, *S]``; ``y`` is unused and must be None."""
        if y is not None:
            raise ValueError("y must be None: JacobianMetric only takes the displacement field (as y_pred).")
        return jacobian_statistics(y_pred, self.mode, self.crop)

    def aggregate(self, reduction: str | None = None) -> dict[str, torch.Tensor]:
        """Reduce the buffered ``[N, 2]`` results.

        Args:
            reduction: ``"mean"`` (NaN-skipping mean over the N fields, 0-dim tensors) or ``"none"`` (``[N]``
                tensors); default: the constructor's.

        Returns:
            ``{"sdlogj": ..., "folding_percent": ...}``.
        """
        reduction = check_option(self.reduction if reduction is None else reduction, "reduction", _JACOBIAN_REDUCTIONS)
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("JacobianMetric has no results to aggregate: call it on a field first.")
        values = torch.nanmean(data, dim=0) if reduction == "mean" else data.T
        return dict(zip(JACOBIAN_KEYS, values))
