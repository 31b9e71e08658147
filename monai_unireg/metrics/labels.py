"""Per-label Dice overlap of integer label maps and the label bookkeeping of the label-map metrics, as torch
functions (no MONAI import: the command line evaluates with them; :mod:`monai_unireg.metrics.dice` holds the metrics).

Registration is evaluated by warping the moving image's labels with the predicted field and comparing them with
the fixed image's labels, label by label (Learn2Reg evaluation, Hering et al., "Learn2Reg: comprehensive
multi-task medical image registration challenge, dataset and evaluation in the era of deep learning",
IEEE TMI 2023; code: https://github.com/MDL-UzL/L2R/tree/main/evaluation).

Both metrics here take integer label maps, not one-hot tensors: ``y_pred`` (the warped moving labels) and ``y``
(the fixed labels), each of shape ``[B, 1, *spatial]`` with 2 or 3 spatial axes, or a list of ``[1, *spatial]``
tensors (MONAI's "list of channel-first tensors").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from monai_unireg.validation import check_labels, check_option, check_same_spatial_shape, check_tensor, plain_tensor

__all__ = [
    "label_dice",
    "label_indices",
    "check_label_pair",
    "label_values_tensor",
    "present_labels",
    "reduce_label_metric",
    "REDUCTIONS",
]

REDUCTIONS = ("mean", "mean_channel", "mean_batch", "none")


def reduce_label_metric(values: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Reduce a ``[N, L]`` table of per-sample, per-label values, ignoring NaN entries (skipped labels).

    Args:
        values: ``[N, L]``, one row per sample (image pair), one column per label; NaN marks a label that does
            not count for that sample.
        reduction: ``"mean"``: mean over samples of the per-sample mean over labels (every pair weighs the same,
            whatever its number of counted labels), a 0-dim tensor; ``"mean_channel"``: per-sample mean over
            labels, ``[N]``; ``"mean_batch"``: per-label mean over samples, ``[L]``; ``"none"``: ``values``.
            Names follow :class:`monai.utils.MetricReduction` ("channel" = label axis, "batch" = sample axis).
            A sample (label) whose entries are all NaN gives NaN and is left out of ``"mean"``.

    Returns:
        the reduced tensor, see ``reduction``.
    """
    check_option(reduction, "reduction", REDUCTIONS)
    if reduction == "none":
        return values
    if reduction == "mean_batch":
        return torch.nanmean(values, dim=0)
    per_sample = torch.nanmean(values, dim=1)
    return per_sample if reduction == "mean_channel" else torch.nanmean(per_sample)


_MAX_TABLE_SIZE = 1 << 22


def _value_range(x: torch.Tensor, values: torch.Tensor | None = None) -> tuple[int, int]:
    """Smallest and largest value of ``x`` (and of ``values`` if given)."""
    low, high = int(x.min()), int(x.max())
    if values is not None and values.numel():
        low, high = min(low, int(values.min())), max(high, int(values.max()))
    return low, high


def label_indices(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Map every voxel of an integer label map to the column of its label in ``values`` (1-based; 0 = other).

    Uses a lookup table when the label values span a moderate range (the usual case), else a sorted search.

    Args:
        x: int64 label map of any shape.
        values: ``[L]`` distinct int64 label values, in column order.

    Returns:
        int64 tensor shaped like ``x``: ``j + 1`` where ``x == values[j]``, 0 where ``x`` is not in ``values``.
    """
    columns = torch.arange(1, values.numel() + 1, device=x.device)
    low, high = _value_range(x, values)
    if high - low < _MAX_TABLE_SIZE:
        table = torch.zeros(high - low + 1, dtype=torch.long, device=x.device)
        table[values - low] = columns
        return table[x - low if low else x]
    order = torch.argsort(values)
    sorted_values = values[order]
    pos = torch.searchsorted(sorted_values, x.contiguous()).clamp_(max=values.numel() - 1)
    return torch.where(sorted_values[pos] == x, columns[order[pos]], torch.zeros_like(pos))


def label_dice(
    y_pred: torch.Tensor, y: torch.Tensor, labels: Sequence[int] | None = None, absent_as_zero: bool = False
) -> torch.Tensor:
    """Dice ``2|P ∩ T| / (|P| + |T|)`` per sample and label (the function form of :class:`LabelDiceMetric`).

    Args:
        y_pred: integer label map ``[B, 1, *spatial]`` (warped moving labels).
        y: integer label map ``[B, 1, *spatial]`` (fixed labels), same shape.
        labels: distinct label values, in output column order; ``None``: the sorted non-zero labels of ``y``.
        absent_as_zero: value of a label absent from both maps: 0 when True, NaN (skipped) when False.

    Returns:
        float32 ``[B, L]`` on the inputs' device.
    """
    y_pred, y = check_label_pair(y_pred, y)
    return _dice_table(y_pred, y, label_values_tensor(labels, y), absent_as_zero)


def _dice_table(y_pred: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, absent_as_zero: bool) -> torch.Tensor:
    """Dice ``[B, L]`` of checked int64 maps ``[B, 1, *spatial]``: one ``bincount`` per term, no one-hot volumes."""
    batch, n = y.shape[0], labels.numel() + 1
    offsets = torch.arange(batch, device=y.device).view(batch, 1) * n
    pred = label_indices(y_pred.reshape(batch, -1), labels) + offsets
    true = label_indices(y.reshape(batch, -1), labels) + offsets
    size = batch * n
    count_pred = torch.bincount(pred.view(-1), minlength=size)
    count_true = torch.bincount(true.view(-1), minlength=size)
    count_both = torch.bincount(true[pred == true], minlength=size)
    total = (count_pred + count_true).view(batch, n)[:, 1:].to(torch.float64)
    dice = 2.0 * count_both.view(batch, n)[:, 1:].to(torch.float64) / total
    dice[total == 0] = 0.0 if absent_as_zero else float("nan")
    return dice.to(torch.float32)


def check_label_pair(y_pred: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair of label maps ``[B, 1, *spatial]`` (2 or 3 spatial axes) and return them as int64 tensors.

    ``y_pred`` may hold no foreground (a registration can lose every label); ``y`` must hold some.
    """
    for x, name in ((y_pred, "y_pred"), (y, "y")):
        check_tensor(x, name, finite=False)  # check_labels below rejects NaN/Inf
        if x.ndim not in (4, 5) or x.shape[1] != 1:
            raise ValueError(
                f"{name} must be an integer label map of shape [B, 1, H, W] or [B, 1, D, H, W], "
                f"got shape {tuple(x.shape)}."
            )
    check_same_spatial_shape(y_pred, y, "y_pred", "y")
    check_labels(y_pred, "y_pred", allow_empty=True)
    check_labels(y, "y")
    return plain_tensor(y_pred).long(), plain_tensor(y).long()


def _check_label_values(labels: Sequence[int] | None) -> tuple[int, ...] | None:
    """Validate the ``labels`` argument: ``None`` or a non-empty sequence of distinct integers."""
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"labels must be a sequence of distinct integers or None, got {labels!r}.")
    values = tuple(labels)
    if not values:
        raise ValueError("labels must not be empty; pass None to take the labels from the fixed map y.")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values) or len(set(values)) != len(values):
        raise ValueError(f"labels must be distinct integers, got {labels!r}.")
    return values


def present_labels(y: torch.Tensor) -> torch.Tensor:
    """The sorted non-zero values of the int64 label map ``y``, int64 ``[L]``."""
    low, high = _value_range(y)
    if high - low < _MAX_TABLE_SIZE:
        values = torch.nonzero(torch.bincount((y - low if low else y).reshape(-1)))[:, 0] + low
    else:
        values = torch.unique(y)
    return values[values != 0]


def label_values_tensor(labels: Sequence[int] | None, y: torch.Tensor) -> torch.Tensor:
    """Validated ``labels`` as an int64 ``[L]`` tensor on ``y``'s device; ``None``: :func:`present_labels` of ``y``."""
    values = _check_label_values(labels)
    if values is None:
        return present_labels(y)
    return torch.tensor(values, dtype=torch.long, device=y.device)
