"""Regularity of a displacement field: SDlogJ (standard deviation of the log Jacobian determinant) and folding,
as torch functions (no MONAI import: the command line uses them; :class:`JacobianMetric` wraps them).

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

from monai_unireg.spatial import jacobian_determinant
from monai_unireg.validation import check_ddf, check_integer, check_option, check_tensor

__all__ = [
    "sdlogj",
    "folding_percentage",
    "jacobian_statistics",
    "cropped_determinant",
    "SDLOGJ_MODES",
    "JACOBIAN_KEYS",
]

SDLOGJ_MODES = ("l2r", "exact")
JACOBIAN_KEYS = ("sdlogj", "folding_percent")
_JACOBIAN_REDUCTIONS = ("mean", "none")


def _check_crop(crop: int, shape: tuple[int, ...]) -> int:
    """Validate ``crop`` (integer >= 0) against a spatial shape it must leave non-empty."""
    check_integer(crop, "crop", 0)
    if shape and min(shape) <= 2 * crop:
        raise ValueError(f"crop={crop} leaves no voxel of a field with spatial shape {shape}.")
    return crop


def cropped_determinant(ddf: torch.Tensor, crop: int = 2) -> torch.Tensor:
    """Jacobian determinant of ``x + ddf(x)`` with ``crop`` voxels removed at every border, flattened.

    Args:
        ddf: ``[B, n, *S]`` displacement in voxels (``n`` = 2 or 3 spatial axes).
        crop: voxels removed at both ends of every spatial axis.

    Returns:
        float64 ``[B, V]``, ``V = prod(S_i - 2 crop)``.
    """
    check_tensor(ddf, "ddf", finite=False)
    if ddf.ndim not in (4, 5):
        raise ValueError(f"ddf must have shape [B, n, *S] with n = 2 or 3 spatial axes, got shape {tuple(ddf.shape)}.")
    check_ddf(ddf, "ddf", ddf.ndim - 2)
    _check_crop(crop, tuple(ddf.shape[2:]))
    det = jacobian_determinant(ddf)[:, 0]
    det = det[(slice(None),) + tuple(slice(crop, size - crop) for size in det.shape[1:])]
    return det.reshape(det.shape[0], -1).to(torch.float64)


def _sdlogj_of(det: torch.Tensor, mode: str) -> torch.Tensor:
    """``[B]`` SDlogJ of flattened determinants ``[B, V]`` (module docstring definitions)."""
    if mode == "l2r":
        return torch.log((det + 3.0).clamp(1e-9, 1e9)).std(dim=1, correction=0)
    positive = det > 0
    count = positive.sum(dim=1)
    log_det = torch.where(positive, torch.log(det.clamp_min(torch.finfo(det.dtype).tiny)), 0.0)
    mean = log_det.sum(dim=1) / count
    variance = torch.where(positive, (log_det - mean.unsqueeze(1)) ** 2, 0.0).sum(dim=1) / count
    return variance.sqrt()


def _folding_of(det: torch.Tensor) -> torch.Tensor:
    """``[B]`` percentage of non-positive determinants in ``[B, V]``."""
    return 100.0 * (det <= 0).to(det.dtype).mean(dim=1)


def sdlogj(ddf: torch.Tensor, mode: str = "l2r", crop: int = 2) -> torch.Tensor:
    """Standard deviation of the log Jacobian determinant per sample (module docstring definitions).

    Args:
        ddf: ``[B, n, *S]`` displacement in voxels.
        mode: ``"l2r"`` (Learn2Reg ``std(log(clip(J + 3, 1e-9, 1e9)))``) or ``"exact"`` (``std(log J)`` over
            ``J > 0``).
        crop: voxels removed at every border before the statistics (Learn2Reg: 2).

    Returns:
        float64 ``[B]``.
    """
    check_option(mode, "mode", SDLOGJ_MODES)
    return _sdlogj_of(cropped_determinant(ddf, crop), mode)


def folding_percentage(ddf: torch.Tensor, crop: int = 2) -> torch.Tensor:
    """Percentage of voxels with ``det(I + grad u) <= 0`` per sample, after cropping ``crop`` voxels per border.

    Args:
        ddf: ``[B, n, *S]`` displacement in voxels.
        crop: voxels removed at every border (default 2, the voxels SDlogJ uses; 0 for the whole field, whose
            border voxels then use one-sided differences).

    Returns:
        float64 ``[B]`` in [0, 100].
    """
    return _folding_of(cropped_determinant(ddf, crop))


def jacobian_statistics(ddf: torch.Tensor, mode: str = "l2r", crop: int = 2) -> torch.Tensor:
    """SDlogJ and folding percentage of every sample from one Jacobian determinant (what
    :class:`~monai_unireg.metrics.JacobianMetric` returns for one call).

    Args:
        ddf: ``[B, n, *S]`` displacement in voxels.
        mode: SDlogJ definition (see :func:`sdlogj`).
        crop: voxels removed at every border before both statistics.

    Returns:
        float32 ``[B, 2]``: column 0 SDlogJ, column 1 the folding percentage (order of :data:`JACOBIAN_KEYS`).
    """
    check_option(mode, "mode", SDLOGJ_MODES)
    det = cropped_determinant(ddf, crop)
    return torch.stack([_sdlogj_of(det, mode), _folding_of(det)], dim=1).to(torch.float32)
