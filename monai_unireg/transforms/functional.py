"""The intensity normalisations of :mod:`monai_unireg.transforms.intensity` as plain torch functions.

No MONAI import: the command line normalises its pair with these (importing MONAI costs it about 3 s), and the
MONAI transforms :class:`~monai_unireg.transforms.CTWindow` / :class:`~monai_unireg.transforms.MRIPercentile`
compute with the same arithmetic, so both give bit-identical values (``tests/transforms/test_functional.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from monai_unireg.validation import check_option

__all__ = [
    "AUTO_CT_THRESHOLD_HU",
    "detect_modality",
    "ct_window",
    "percentile",
    "mri_percentile",
    "normalise_modality",
]

#: CT images whose 1st intensity percentile lies below this (HU) are treated as CT by ``modality="auto"``.
AUTO_CT_THRESHOLD_HU = -500.0
#: Above this many values a percentile is computed by ``numpy.percentile`` (as MONAI does: pytorch#64947).
_NUMPY_PERCENTILE_ABOVE = 1_000_000


def detect_modality(image: torch.Tensor) -> str:
    """``"ct"`` when the 1st intensity percentile is below -500 (air in HU), else ``"mri"``."""
    sample = torch.as_tensor(image).flatten()[:: max(1, image.numel() // 1_000_000)].to(torch.float64)
    return "ct" if float(percentile(sample, 1.0)) < AUTO_CT_THRESHOLD_HU else "mri"


def ct_window(x: torch.Tensor, a_min: float, a_max: float, b_min: float, b_max: float) -> torch.Tensor:
    """``[a_min, a_max]`` mapped linearly onto ``[b_min, b_max]`` and clipped there (MONAI's
    ``ScaleIntensityRange(clip=True)`` arithmetic, in the dtype of ``x``); ``x`` of any shape, ``a_min < a_max``."""
    scaled = (x - a_min) / (a_max - a_min)
    return torch.clamp(scaled * (b_max - b_min) + b_min, b_min, b_max)


def percentile(x: torch.Tensor, q: float, dim: int | None = None) -> torch.Tensor:
    """The ``q``-th percentile (linear interpolation, ``numpy.percentile``'s default) of floating ``x`` (over ``dim``,
    or all values), in ``x``'s dtype; NaN where the values hold a NaN (as ``torch.quantile``).

    Up to a million values it interpolates between the two order statistics around ``q / 100 * (n - 1)``, found with
    ``torch.kthvalue`` (a selection, 13 ms for a 2 mm brain of 0.86 M voxels where ``torch.quantile``, which sorts,
    took 72 ms, twice per image of the command line); above, ``numpy.percentile`` (MONAI's ``percentile``, whose
    choice it follows there: pytorch#64947).
    """
    if x.numel() > _NUMPY_PERCENTILE_ABOVE:
        value = np.percentile(x.detach().cpu().numpy(), np.asarray(q), axis=dim)
        return torch.as_tensor(value, dtype=x.dtype, device=x.device)
    values = x.flatten() if dim is None else x
    axis = 0 if dim is None else dim
    count = values.shape[axis]
    # the rank and its weight in x's dtype, as torch.quantile computes them (bit-identical results)
    rank = torch.as_tensor(float(q) / 100.0, dtype=x.dtype, device=x.device) * (count - 1)
    below = int(rank)
    low = torch.kthvalue(values, below + 1, dim=axis).values
    high = torch.kthvalue(values, min(below + 2, count), dim=axis).values
    result = torch.lerp(low, high, rank - below)
    return torch.where(torch.isnan(values).any(dim=axis), torch.nan, result)


def mri_percentile(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, b_min: float, b_max: float) -> torch.Tensor:
    """``[low, high]`` mapped linearly onto ``[b_min, b_max]`` and clipped; ``b_min`` everywhere where
    ``high <= low`` (a constant image). ``low`` / ``high`` broadcast against floating ``x``."""
    span = high - low
    unit = torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1.0), 0.0).clamp(0.0, 1.0)
    return unit * (b_max - b_min) + b_min


def normalise_modality(
    image: torch.Tensor,
    modality: str,
    ct_window_hu: Sequence[float] = (-800.0, 500.0),
    output_range: Sequence[float] = (0.0, 1.0),
) -> torch.Tensor:
    """``image`` (any shape, floating) to ``output_range`` as ``modality_normaliser(modality, ...)`` does: CT by
    the HU window ``ct_window_hu``, MRI by [min, 99th percentile]; float32 (a plain tensor)."""
    check_option(modality, "modality", ("ct", "mri"))
    low, high = (float(v) for v in output_range)
    if modality == "ct":
        window = ct_window(image, float(ct_window_hu[0]), float(ct_window_hu[1]), low, high)
        return window.to(torch.float32)
    return mri_percentile(image, image.min(), percentile(image, 99.0), low, high).to(torch.float32)
