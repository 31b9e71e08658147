"""Intensity normalisation presets of the registration methods: CT windowing and MRI percentile scaling.

Both work on channel-first images of any spatial rank (``[C, *spatial]``) given as ``torch.Tensor``,
``monai.data.MetaTensor`` (metadata kept) or ``numpy.ndarray``; like MONAI's ``ScaleIntensityRange``,
the result is a tensor (a ``MetaTensor`` when metadata tracking is on), ``float32`` by default.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor, get_track_meta
from monai.transforms import MapTransform, ScaleIntensityRange, Transform
from monai.utils import TransformBackends, convert_to_tensor, get_equivalent_dtype

from monai_unireg.transforms.functional import AUTO_CT_THRESHOLD_HU, detect_modality, mri_percentile, percentile
from monai_unireg.validation import check_number, check_option, check_tensor

__all__ = [
    "CT_WINDOW_PRESETS",
    "CTWindow",
    "CTWindowd",
    "MRIPercentile",
    "MRIPercentiled",
    "AUTO_CT_THRESHOLD_HU",
    "detect_modality",
    "modality_normaliser",
    "RegistrationIntensityd",
]

#: HU window ``(a_min, a_max)`` and output range ``(b_min, b_max)`` of each method (METHODS.md).
CT_WINDOW_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "unigradicon": (-1000.0, 1000.0, 0.0, 1.0),
    "promptreg": (-1000.0, 1000.0, 0.0, 1.0),
    "sacbnet": (-1000.0, 1000.0, 0.0, 1.0),
    "voxelopt": (-800.0, 500.0, 0.0, 1.0),
    "unireg": (-800.0, 400.0, -1.0, 1.0),
}


def _check_range(low: float, high: float, name_low: str, name_high: str) -> None:
    """Raise ``ValueError`` unless ``low < high`` and both are finite numbers."""
    check_number(low, name_low)
    check_number(high, name_high)
    if low >= high:
        raise ValueError(f"{name_low} must be smaller than {name_high}, got {name_low}={low}, {name_high}={high}.")


def _as_checked_tensor(img: NdarrayOrTensor, name: str = "img") -> torch.Tensor:
    """Convert ``img`` to a (Meta)Tensor and check that it is non-empty and finite."""
    if not isinstance(img, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(img).__name__}.")
    tensor = convert_to_tensor(img, track_meta=get_track_meta())
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}.")
    return check_tensor(tensor, name)


class CTWindow(ScaleIntensityRange):
    """Clip CT intensities (HU) to ``[a_min, a_max]`` and map that window linearly onto ``[b_min, b_max]``.

    ``a_min -> b_min``, ``a_max -> b_max``; values outside the window are clipped. Presets
    (:data:`CT_WINDOW_PRESETS`, see :meth:`from_preset`): uniGradICON, PromptReg and SACB-Net use
    ``[-1000, 1000] -> [0, 1]``, VoxelOpt ``[-800, 500] -> [0, 1]``, UniReg ``[-800, 400] -> [-1, 1]``.

    Args:
        a_min: lower end of the HU window.
        a_max: upper end of the HU window, ``> a_min``.
        b_min: output value of ``a_min``.
        b_max: output value of ``a_max``, ``> b_min``.
        dtype: output dtype (``float32`` by default, so ``int16`` CT becomes floating point).

    Input ``[C, *spatial]`` (any rank), output of the same shape.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        a_min: float = -1000.0,
        a_max: float = 1000.0,
        b_min: float = 0.0,
        b_max: float = 1.0,
        dtype: DtypeLike = torch.float32,
    ) -> None:
        _check_range(a_min, a_max, "a_min", "a_max")
        _check_range(b_min, b_max, "b_min", "b_max")
        super().__init__(a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True, dtype=dtype)

    @classmethod
    def from_preset(cls, method: str, dtype: DtypeLike = torch.float32) -> CTWindow:
        """The CT window of ``method`` (a key of :data:`CT_WINDOW_PRESETS`, e.g. ``"unireg"``)."""
        check_option(method, "method", CT_WINDOW_PRESETS)
        a_min, a_max, b_min, b_max = CT_WINDOW_PRESETS[method]
        return cls(a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, dtype=dtype)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Window ``img`` ``[C, *spatial]``; raises ``ValueError`` for NaN/Inf values."""
        return super().__call__(_as_checked_tensor(img))


class MRIPercentile(Transform):
    """Clip an MR image at ``[min, percentile-th percentile]`` and map that range linearly onto ``[b_min, b_max]``.

    The uniGradICON / PromptReg MRI normalisation (``percentile=99``, output ``[0, 1]``): the image
    minimum maps to ``b_min``, the percentile value to ``b_max`` and brighter voxels are clipped to ``b_max``.
    A constant image (or one whose percentile equals its minimum) maps to ``b_min`` everywhere.
    Percentiles use linear interpolation (``numpy.percentile`` / ``torch.quantile`` default).

    Args:
        percentile: upper percentile in ``(0, 100]``.
        b_min: output value of the image minimum.
        b_max: output value of the percentile, ``> b_min``.
        channel_wise: compute minimum and percentile per channel instead of over the whole image.
        dtype: output dtype.

    Input ``[C, *spatial]`` (any rank), output of the same shape.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        percentile: float = 99.0,
        b_min: float = 0.0,
        b_max: float = 1.0,
        channel_wise: bool = False,
        dtype: DtypeLike = torch.float32,
    ) -> None:
        check_number(percentile, "percentile")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}.")
        _check_range(b_min, b_max, "b_min", "b_max")
        self.percentile = float(percentile)
        self.b_min = float(b_min)
        self.b_max = float(b_max)
        self.channel_wise = channel_wise
        self.dtype = get_equivalent_dtype(dtype, torch.Tensor)

    def _bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Minimum and percentile of ``x`` (per channel, shaped to broadcast, when ``channel_wise``)."""
        values = x.as_tensor() if isinstance(x, MetaTensor) else x
        if not self.channel_wise:
            return values.min(), percentile(values, self.percentile)
        if values.ndim < 2:
            raise ValueError(f"img must be channel-first [C, *spatial] for channel_wise=True, got {tuple(x.shape)}.")
        flat = values.reshape(values.shape[0], -1)
        view = (-1,) + (1,) * (values.ndim - 1)
        high = percentile(flat, self.percentile, dim=1)
        return flat.min(dim=1).values.reshape(view), high.reshape(view)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Normalise ``img`` ``[C, *spatial]``; raises ``ValueError`` for NaN/Inf values."""
        tensor = _as_checked_tensor(img)
        x = tensor if tensor.is_floating_point() else tensor.to(torch.float32)
        low, high = self._bounds(x)
        return mri_percentile(x, low, high, self.b_min, self.b_max).to(self.dtype)


class CTWindowd(MapTransform):
    """Dictionary version of :class:`CTWindow`: window every image under ``keys``.

    Args:
        keys: image keys, e.g. ``("fixed_image", "moving_image")``.
        a_min, a_max, b_min, b_max, dtype: see :class:`CTWindow`.
        allow_missing_keys: skip keys absent from the dictionary instead of raising ``KeyError``.
    """

    backend = CTWindow.backend

    def __init__(
        self,
        keys: KeysCollection,
        a_min: float = -1000.0,
        a_max: float = 1000.0,
        b_min: float = 0.0,
        b_max: float = 1.0,
        dtype: DtypeLike = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = CTWindow(a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, dtype=dtype)

    @classmethod
    def from_preset(
        cls, keys: KeysCollection, method: str, dtype: DtypeLike = torch.float32, allow_missing_keys: bool = False
    ) -> CTWindowd:
        """The CT window of ``method`` (a key of :data:`CT_WINDOW_PRESETS`) applied to ``keys``."""
        check_option(method, "method", CT_WINDOW_PRESETS)
        a_min, a_max, b_min, b_max = CT_WINDOW_PRESETS[method]
        return cls(keys, a_min, a_max, b_min, b_max, dtype=dtype, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Window ``data[key]`` for every key in ``keys``."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _apply_named(self.window, d[key], key)
        return d


class MRIPercentiled(MapTransform):
    """Dictionary version of :class:`MRIPercentile`: normalise every image under ``keys``.

    Args:
        keys: image keys, e.g. ``("fixed_image", "moving_image")``.
        percentile, b_min, b_max, channel_wise, dtype: see :class:`MRIPercentile`.
        allow_missing_keys: skip keys absent from the dictionary instead of raising ``KeyError``.
    """

    backend = MRIPercentile.backend

    def __init__(
        self,
        keys: KeysCollection,
        percentile: float = 99.0,
        b_min: float = 0.0,
        b_max: float = 1.0,
        channel_wise: bool = False,
        dtype: DtypeLike = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalise = MRIPercentile(percentile, b_min, b_max, channel_wise=channel_wise, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise ``data[key]`` for every key in ``keys``."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _apply_named(self.normalise, d[key], key)
        return d


def _apply_named(transform: Transform, img: NdarrayOrTensor, key: Hashable) -> NdarrayOrTensor:
    """Apply ``transform`` to ``img``, naming the dictionary key in a ``ValueError`` about the image."""
    try:
        return transform(img)
    except ValueError as err:
        raise ValueError(f"data[{key!r}]: {err}") from err


def modality_normaliser(
    modality: str, ct_window: Sequence[float] = (-800.0, 500.0), output_range: Sequence[float] = (0.0, 1.0)
) -> Transform:
    """The normalisation of one modality to ``output_range``: CT by the HU window ``ct_window`` (:class:`CTWindow`),
    MRI by [min, 99th percentile] (:class:`MRIPercentile`); shared by the command line and the bundles."""
    check_option(modality, "modality", ("ct", "mri"))
    low, high = (float(v) for v in output_range)
    if modality == "ct":
        return CTWindow(a_min=float(ct_window[0]), a_max=float(ct_window[1]), b_min=low, b_max=high)
    return MRIPercentile(b_min=low, b_max=high)


class RegistrationIntensityd(MapTransform):
    """The intensity normalisation of the registration bundles: each image under ``keys`` to ``output_range``, CT
    by the HU window ``ct_window`` (:class:`CTWindow`), MRI by [min, 99th percentile] (:class:`MRIPercentile`).

    With ``modality="auto"`` every image is normalised by its own detected modality (:func:`detect_modality`: CT
    when its 1st percentile is below -500 HU), so a CT-MRI pair gets the window for the CT and the percentiles for
    the MRI.

    Args:
        keys: image keys, e.g. ``("fixed_image", "moving_image")``.
        modality: ``"auto"``, ``"ct"`` or ``"mri"``.
        ct_window: ``(a_min, a_max)`` HU window of CT images.
        output_range: ``(b_min, b_max)`` (most methods [0, 1]; UniReg [-1, 1]).
        allow_missing_keys: skip keys absent from the dictionary.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str = "auto",
        ct_window: tuple[float, float] = (-800.0, 500.0),
        output_range: tuple[float, float] = (0.0, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = check_option(modality, "modality", ("auto", "ct", "mri"))
        if len(ct_window) != 2 or len(output_range) != 2:
            raise ValueError(f"ct_window and output_range must be 2 values each, got {ct_window!r}, {output_range!r}.")
        self.transforms = {name: modality_normaliser(name, ct_window, output_range) for name in ("ct", "mri")}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            modality = detect_modality(d[key]) if self.modality == "auto" else self.modality
            d[key] = _apply_named(self.transforms[modality], d[key], key)
        return d
