"""95th-percentile symmetric Hausdorff distance (HD95) per label, in millimetres, as a MONAI metric
(:class:`HD95Metric`).

The definition (MONAI's ``HausdorffDistanceMetric`` with ``percentile=95``, its differences from the Learn2Reg
evaluation) and the computation are in :mod:`monai_unireg.metrics.hausdorff`, torch and SciPy functions that the
command line uses without importing MONAI.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor

from monai_unireg.metrics.dice import LabelMapMetric
from monai_unireg.metrics.hausdorff import (
    SpacingLike,
    _broadcast_spacing,
    _check_default_spacing,
    _check_percentile,
    _hausdorff_table,
    label_hausdorff_distance,
    replace_one_sided,
)
from monai_unireg.metrics.labels import check_label_pair
from monai_unireg.spatial import spacing_from_affine

__all__ = ["HD95Metric", "label_hausdorff_distance", "spacing_from_affine", "SpacingLike"]


class HD95Metric(LabelMapMetric):
    """95th-percentile symmetric Hausdorff distance per label in millimetres (Learn2Reg "HD95").

    See the module docstring for the exact definition (MONAI's: max of the two directed 95th percentiles of
    voxel-surface distances) and how it differs from the surfel-weighted ``surface-distance`` package.

    Spacing, first found wins: the ``spacing`` argument of the call; the constructor's ``spacing``; the affine of
    ``y`` when it is a :class:`monai.data.MetaTensor` (column norms of ``y.affine``, ``[n+1, n+1]`` or per sample
    ``[B, n+1, n+1]``); otherwise 1 (distances in voxels), with a warning.

    Labels absent from both maps are NaN and skipped by every reduction. A label present in only one map has an
    infinite distance; it is reported as ``missing_value`` (default NaN, so skipped too) with a warning, because one
    infinite entry would make every mean infinite. Pass e.g. the image diagonal in mm as ``missing_value`` to
    penalise lost labels instead.

    Args:
        labels: label values to evaluate (output columns), or ``None`` to take the non-zero labels of the fixed
            map, see :class:`~monai_unireg.metrics.dice.LabelMapMetric`.
        spacing: default voxel spacing in mm: a number or one number per spatial axis.
        percentile: percentile of each directed distance set, in [0, 100] (100: the Hausdorff distance).
        missing_value: value reported for a label present in only one of the two maps (NaN, inf or >= 0).
        reduction: default reduction of :meth:`aggregate`, see
            :func:`~monai_unireg.metrics.labels.reduce_label_metric`.

    Calling the metric on ``y_pred``, ``y`` (integer label maps ``[B, 1, *spatial]``) and optionally
    ``spacing=`` (a number, one per spatial axis, or ``[B, n]`` per sample) returns the float32 ``[B, L]`` table
    of the batch and buffers it. With a list of channel-first
    maps, ``spacing`` applies to every item (pass one spacing, not one per sample).
    """

    def __init__(
        self,
        labels: Sequence[int] | None = None,
        spacing: SpacingLike | None = None,
        percentile: float = 95.0,
        missing_value: float = float("nan"),
        reduction: str = "mean",
    ) -> None:
        super().__init__(labels=labels, reduction=reduction)
        self.spacing = _check_default_spacing(spacing)
        self.percentile = _check_percentile(percentile)
        if isinstance(missing_value, bool) or not isinstance(missing_value, (int, float)) or missing_value < 0:
            raise ValueError(f"missing_value must be NaN, inf or a number >= 0, got {missing_value!r}.")
        self.missing_value = float(missing_value)
        self._warned_unit_spacing = False

    def _resolve_spacing(self, spacing: SpacingLike | None, y: torch.Tensor) -> np.ndarray:
        """``[B, n]`` spacing for batch ``y`` (precedence in the class docstring)."""
        batch, spatial_dims = y.shape[0], y.ndim - 2
        if spacing is None:
            spacing = self.spacing
        if spacing is None and isinstance(y, MetaTensor):
            spacing = spacing_from_affine(y.affine, spatial_dims)
        if spacing is None:
            if not self._warned_unit_spacing:
                warnings.warn(
                    "HD95Metric got no spacing (argument or MetaTensor affine of y): distances are in voxels.",
                    stacklevel=3,
                )
                self._warned_unit_spacing = True
            spacing = 1.0
        return _broadcast_spacing(spacing, batch, spatial_dims)

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, spacing: SpacingLike | None = None
    ) -> torch.Tensor:
        if y is None:
            raise ValueError("y (the fixed label map) is required.")
        pred_ids, true_ids = check_label_pair(y_pred, y)
        labels = self._label_tensor(true_ids)
        table = _hausdorff_table(pred_ids, true_ids, labels, self._resolve_spacing(spacing, y), self.percentile)
        return replace_one_sided(table, labels, self.missing_value, stacklevel=3)
