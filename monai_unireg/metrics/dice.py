"""Per-label Dice overlap of integer label maps as MONAI metrics.

The definitions (Learn2Reg's per-label evaluation, label bookkeeping, integer label maps ``[B, 1, *spatial]`` or a
list of ``[1, *spatial]`` tensors) and the computation are the torch functions of :mod:`monai_unireg.metrics.labels`,
which the command line uses without importing MONAI; the classes here wrap them for MONAI's metric API.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import CumulativeIterationMetric

from monai_unireg.metrics.labels import (
    REDUCTIONS,
    _check_label_values,
    _dice_table,
    check_label_pair,
    present_labels,
    reduce_label_metric,
)
from monai_unireg.validation import check_option

__all__ = ["LabelMapMetric", "LabelDiceMetric"]


class LabelMapMetric(CumulativeIterationMetric):
    """Base class of per-label metrics of integer label maps: input checks, label columns and reduction.

    Each call on a batch returns (and buffers) a ``[B, L]`` table, one column per label of :attr:`label_values`.

    Args:
        labels: label values to evaluate, in output column order. ``None``: the non-zero labels found in the
            fixed map ``y`` of the first call after construction or :meth:`reset` (union over that batch, sorted);
            they are then kept, and a later fixed map holding another label raises ``ValueError`` (the columns
            of the buffered results must stay aligned). For datasets whose label sets differ between cases,
            pass the evaluation labels explicitly (e.g. ``evaluation_labels`` of the dataset json).
        reduction: default reduction of :meth:`aggregate`, see :func:`reduce_label_metric`.
    """

    def __init__(self, labels: Sequence[int] | None = None, reduction: str = "mean") -> None:
        self.labels = _check_label_values(labels)
        self.reduction = check_option(reduction, "reduction", REDUCTIONS)
        self._label_values: tuple[int, ...] | None = self.labels
        super().__init__()

    @property
    def label_values(self) -> tuple[int, ...] | None:
        """The label value of each output column (``None`` before the first call when inferring labels)."""
        return self._label_values

    def reset(self) -> None:
        """Clear the buffered results (and the inferred labels when ``labels`` is None)."""
        super().reset()
        self._label_values = self.labels

    def aggregate(self, reduction: str | None = None) -> torch.Tensor:
        """Reduce the buffered ``[N, L]`` results (N samples seen since :meth:`reset`).

        Args:
            reduction: overrides the constructor's ``reduction``; see :func:`reduce_label_metric`.
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no results to aggregate: call it on a batch first.")
        return reduce_label_metric(data, self.reduction if reduction is None else reduction)

    def _label_tensor(self, y: torch.Tensor) -> torch.Tensor:
        """The ``[L]`` label values of the output columns for fixed map ``y`` (inferring them if needed)."""
        if self._label_values is None:
            self._label_values = tuple(present_labels(y).tolist())
        elif self.labels is None:
            new = sorted(set(present_labels(y).tolist()) - set(self._label_values))
            if new:
                raise ValueError(
                    f"labels=None took the labels {list(self._label_values)} from the first fixed map, but y now "
                    f"holds labels {new} too; pass labels=[...] explicitly when label sets differ between cases."
                )
        return torch.tensor(self._label_values, dtype=torch.long, device=y.device)


class LabelDiceMetric(LabelMapMetric):
    """Dice overlap per label between warped moving labels and fixed labels (Learn2Reg "DSC").

    ``Dice_l = 2 |P_l ∩ T_l| / (|P_l| + |T_l|)`` with ``P_l = {y_pred == l}``, ``T_l = {y == l}``. A label absent
    from both maps has no defined Dice: by default it is NaN and skipped by every reduction; with
    ``absent_as_zero=True`` it counts as 0, as in the methods' reference evaluation codes (which lowers the mean).
    A label present in only one map has Dice 0.

    Counting uses one ``torch.bincount`` per term over the whole batch (no one-hot volumes), on the inputs'
    device.

    Args:
        labels: label values to evaluate (output columns), or ``None`` to take the non-zero labels of the fixed
            map, see :class:`LabelMapMetric`.
        absent_as_zero: count a label absent from both maps as 0 instead of skipping it.
        reduction: default reduction of :meth:`aggregate` (``"mean"``: mean over pairs of the per-pair mean
            Dice over labels; ``"mean_channel"``: per-pair mean ``[N]``; ``"mean_batch"``: per-label mean
            ``[L]``; ``"none"``: ``[N, L]``), see :func:`reduce_label_metric`.

    Calling the metric on ``y_pred``, ``y`` (integer-valued label maps ``[B, 1, *spatial]``, 2 or 3 spatial
    axes, same shape) returns the float32 ``[B, L]`` Dice table of the batch and buffers it.

    Example::

        metric = LabelDiceMetric(labels=[1, 2, 3])
        for fixed_labels, warped_labels in pairs:
            metric(warped_labels, fixed_labels)
        mean_dice = metric.aggregate().item()
        dice_per_label = metric.aggregate("mean_batch")  # [3]
    """

    def __init__(
        self, labels: Sequence[int] | None = None, absent_as_zero: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__(labels=labels, reduction=reduction)
        self.absent_as_zero = absent_as_zero

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if y is None:
            raise ValueError("y (the fixed label map) is required.")
        y_pred, y = check_label_pair(y_pred, y)
        return _dice_table(y_pred, y, self._label_tensor(y), self.absent_as_zero)
